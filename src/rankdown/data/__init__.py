"""A user's data: image folders, tensor files, ``package.module:function`` loaders, text for
language models, each as a :class:`~rankdown.data.sources.Data` streamed in batches."""
