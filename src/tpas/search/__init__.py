"""Search: encode galleries and queries, persist an index, re-rank with ITM, post-process rankings.

Import the submodules directly (``tpas.search.encode``, ``tpas.search.engine``...); this package
file stays empty so that ``import tpas.search`` is cheap.
"""
