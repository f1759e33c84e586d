"""Files on disk: atomic writes, typed YAML, the run and adapter folders, images, and the CLIs' settings objects."""
