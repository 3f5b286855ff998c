"""Retrieval: exact cosine search, retrieval metrics, query expansion / re-ranking, embedding ensembles.

Read in this order: metrics (top-1, mAP@k, recall@k, DIGIX), search (chunked exact
kNN), rerank (alpha-QE, DBA, k-reciprocal), select (greedy weighted concatenation),
core (`score_methods`, the query/gallery search: scores.csv and submission.csv), cli (`python -m ensemble.retrieve`).
"""
