"""Nearest-neighbour search and exact ranks, on CPU or GPU.

- ``knn``: exact top-k by inner product (FAISS), over a database or one shard of it,
  and the merge of shards' lists;
- ``scan``: one pass over the database that gives both the exact full-ranking ranks of
  every positive and the exact top-k lists, block by block within a memory budget;
- ``graph``: the k-NN graph of a feature set (exact, or HNSW/IVF with measured recall);
- ``ranks``: positive ranks from top-k lists, and the exact full ranking kept whole;
- ``counting``: the kernel that counts scores above thresholds without sorting;
- ``topk``: exact top-k lists from blocks of scores (the scan's);
- ``labels``: each query's positives, as class slices of a label-ordered database;
- ``sharded``: the full ranking across database shards (two passes);
- ``blocks``: blocked work over query rows (budget, workspaces, a thread pool on CPU,
  the GPU's code path).
"""
