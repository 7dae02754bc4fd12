"""A trivial Flower app: the floor fedmerge's simulation overhead is measured against."""
