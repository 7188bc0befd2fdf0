"""What happens to a payload on its way to the Temporal server and back: the codec chain
(compression, encryption) and external storage for large payloads."""
