"""Models: locating and loading weights safely, tiny presets, the safety checker, speed switches, devices."""
