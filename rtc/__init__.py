"""Real-time calls: imfc packets over WebRTC (aiortc), a network impairment layer, simulation."""
