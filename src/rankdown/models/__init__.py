"""A user's model: ``package.module:factory`` callables, weights files read without unpickling
code, and Hugging Face folders (``hf:PATH``)."""
