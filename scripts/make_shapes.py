"""python scripts/make_shapes.py <folder>: a small image folder of circles, squares and triangles for data=folder."""

from cnnlab.cli import make_shapes_main

if __name__ == "__main__":
    make_shapes_main()
