"""The data layer: offline assets, data set loaders, and the prepared reranking data of a run."""
