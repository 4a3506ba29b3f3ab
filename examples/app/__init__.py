"""The example application that `healer demo` breaks and heals."""
