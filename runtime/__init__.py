"""nestpatch.runtime: attach/detach patches on live torch models, llama.cpp sessions, chat.

Importing this package loads neither torch nor llama.cpp; they are imported when used.
"""

from .attach import AttachHandle, attach, attached_patches, check_model_base, swap
from .llama_session import Generation, LlamaSession, open_session

__all__ = ["AttachHandle", "attach", "attached_patches", "check_model_base", "swap", "Generation", "LlamaSession", "open_session"]
