"""Pure tensor ops (no transformers, nothing of ours above). Layers call `dispatch`, never a kernel."""
