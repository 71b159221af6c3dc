"""The test model: a generated data set (shapes), its training script (train) and its weights."""
