"""The application on top of the library: the end-to-end job (pipeline), the command line, the
report and the analysis. Only this package and the zoo may import :mod:`rankdown.zoo`."""
