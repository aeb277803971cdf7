"""Input decoding: files, bytes and arrays to the in-memory formats the encoders take."""
