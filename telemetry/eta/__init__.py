"""The ETA model: phase-aware, calibrated from the log's own history, updated live.

``shape`` turns a ``JobStarted`` into the features that drive cost (tokens, pixels, passes);
``model`` holds per-component cost functions and their published priors; ``fit`` calibrates
them by robust least squares; ``live`` estimates the remaining time of a running job;
``evaluate`` scores estimators at fixed fractions of each job's actual duration.
"""
