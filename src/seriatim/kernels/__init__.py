"""seriatim's own C++ CPU kernels (csrc/) and the library that builds and loads them (library.py)."""
