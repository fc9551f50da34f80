"""Preview images: sample checkpoints and unmaterialised recipes.

Importing this package is cheap. The text side (CLIP tokenizer, A1111 prompt emphasis, PNG
infotext) needs only the standard library; torch is imported by the functions that use it.
"""
