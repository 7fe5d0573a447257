"""Knowledge bases: document ingestion, embeddings in Chroma, retrieval with citations."""
