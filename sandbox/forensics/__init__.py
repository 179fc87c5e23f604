"""NaN forensics: find and explain the first operation that produced a NaN or an inf."""
