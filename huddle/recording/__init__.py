"""Server-side recording: an internal subscriber of the SFU, a log of frames, writers, and storage."""
