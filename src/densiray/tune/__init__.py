"""Ray Tune: search spaces, the Tuner wiring, and selection and export of the winner."""
