"""Dataset curation: embed, dedup, retrieve, balance, write MDS."""
