"""The SHAPES world, alignment training and evaluation."""
