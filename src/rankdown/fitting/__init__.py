"""Data-aware fitting: weighted metrics (Mahalanobis, covariance whitening, ASVD), data
reconstruction of factorized layers on calibration inputs, and the replay that reruns only the
part of a network after a layer."""
