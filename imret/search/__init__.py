"""Nearest-neighbour search and exact ranks, on CPU or GPU.

- ``knn``: exact top-k by inner product (FAISS), over a database or one shard of it,
  and the merge of shards' lists;
- ``graph``: the k-NN graph of a feature set (exact, or HNSW/IVF with measured recall);
- ``ranks``: positive ranks from top-k lists, and the exact full ranking;
- ``counting``: the kernel that counts scores above thresholds without sorting;
- ``sharded``: the full ranking across database shards (two passes);
- ``blocks``: blocked work over query rows (workspaces, a thread pool on CPU).
"""
