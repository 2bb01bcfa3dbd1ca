"""WebRTC media transport pieces, one module per protocol: RTP and RTCP codecs first."""
