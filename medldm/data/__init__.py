"""Data: the sample sheet, preparation, the demo cohort, prepared sets and the HDF5 layout."""
