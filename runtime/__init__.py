"""nestpatch.runtime: attach/detach patches on live torch models, llama.cpp sessions, chat."""
