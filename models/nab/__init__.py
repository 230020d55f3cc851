"""The Numenta Anomaly Benchmark in rtml: the scorer (``scorer``) and the corpus runner that writes
NAB result files from the streaming detector (``runner``)."""
