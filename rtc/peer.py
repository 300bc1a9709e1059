"""The WebRTC side of a call (aiortc): the peer connection, its two data channels, and the
impairment layer in front of the media channel.

    media   "imfc"     unordered, no retransmissions (maxRetransmits=0): imfc packets both ways,
                       each a datagram that arrives once, late, or never, like RTP over UDP
    control "control"  reliable and ordered: JSON messages that set up and end the call
                       (hello with the model id, bye with the capture clock, the receiver's report)

The caller (sender) creates both channels and makes the offer; the callee answers.
"""

from __future__ import annotations

import asyncio
import time

from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection

from rtc.impairment import Link, LinkConfig

MEDIA, CONTROL = "imfc", "control"


def peer_connection() -> RTCPeerConnection:
    # no STUN/TURN servers: host candidates are all a call on one machine (or one LAN) needs,
    # and the default public STUN server would stall offline
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


def open_channels(pc: RTCPeerConnection) -> tuple[RTCDataChannel, RTCDataChannel]:
    media = pc.createDataChannel(MEDIA, ordered=False, maxRetransmits=0)
    control = pc.createDataChannel(CONTROL)
    return media, control


async def wait_open(channel: RTCDataChannel, timeout: float) -> None:
    if channel.readyState == "open":
        return
    opened = asyncio.Event()
    channel.on("open", opened.set)
    await asyncio.wait_for(opened.wait(), timeout)


UDP_IP_OVERHEAD = 28  # bytes per datagram: IPv4 (20) + UDP (8) headers


def wire_counters(pc: RTCPeerConnection) -> tuple[int, int] | None:
    """(bytes, datagrams) this peer has sent through DTLS so far: imfc packets plus SCTP and DTLS
    framing, acknowledgements and heartbeats, without IP/UDP headers. aiortc keeps these counters
    on its DTLS transport without a public accessor; None if that ever changes."""
    try:
        stats = list(pc.sctp.transport._get_stats().values())[0]
        return stats.bytesSent, stats.packetsSent
    except (AttributeError, IndexError):
        return None


class ImpairedChannel:
    """Sends datagrams on a data channel through a ``Link``: some are dropped, the rest leave
    after the link's delay, jitter and bandwidth queue. Call from the event loop's thread."""

    def __init__(self, channel: RTCDataChannel, cfg: LinkConfig):
        self.channel = channel
        self.link = Link(cfg)
        self.loop = asyncio.get_running_loop()
        self.bytes = 0
        self.latest = 0.0  # clock time the last scheduled datagram leaves

    def send(self, data: bytes) -> None:
        self.bytes += len(data)
        now = time.time()
        at = self.link.schedule(now, len(data))
        if at is None:
            return
        self.latest = max(self.latest, at)
        if at <= now:
            self._send(data)
        else:
            self.loop.call_later(at - now, self._send, data)

    def _send(self, data: bytes) -> None:
        if self.channel.readyState == "open":
            self.channel.send(data)

    async def drain(self) -> None:
        """Wait until every datagram scheduled so far has left."""
        await asyncio.sleep(max(self.latest - time.time(), 0) + 0.05)
