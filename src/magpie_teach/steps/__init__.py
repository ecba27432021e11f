"""distilabel steps over the library: the only place that imports distilabel."""
