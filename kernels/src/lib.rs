//! troupe kernels (filled in by the kernels work).
