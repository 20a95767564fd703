"""Synthetic worlds: made-up people drawn as pictures, the small checkpoints trained to
recognise them, and the `demo` command that erases some of them. Not part of the library core."""
