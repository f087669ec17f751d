"""FrozenSwiGLU's pending draw, run outside the graph under torch.compile (a generator's draw has no
graph; fullgraph=True refuses it). Imported by FrozenSwiGLU._draw_pending only while Dynamo traces it:
torch.compiler.disable imports Dynamo, which `import lwt` otherwise never needs."""
import torch

from .layers import FrozenSwiGLU

draw_pending_now = torch.compiler.disable(FrozenSwiGLU._draw_pending_now)
