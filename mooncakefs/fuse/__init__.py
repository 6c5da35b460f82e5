"""mooncakefs as a mounted filesystem (pyfuse3 + trio)."""
