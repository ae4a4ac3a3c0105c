"""Pseudo-labelling for the cluster-finetune loop: methods (``methods``), the density-peak
method (``density``) and the stage (``stage``). The k-NN graph comes from ``imret.search.graph``,
the quality figures from ``imret.metrics`` and the sidecar from ``imret.data.labels``."""
