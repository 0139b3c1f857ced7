"""What every model queue shares: the dynamic batcher, the page window, fair share across
clients and request deadlines. Below the pipeline and the engine; knows no model."""
