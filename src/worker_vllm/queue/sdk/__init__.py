"""The runpod SDK boundary: the only modules that name the SDK's internals (its job-state file,
its job scaler). ``tests/test_sdk_intake.py`` checks the names and signatures they rely on."""
