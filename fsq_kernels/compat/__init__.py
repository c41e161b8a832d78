"""Drop-in look-alikes of other FSQ libraries: change one import line, keep your checkpoints."""
