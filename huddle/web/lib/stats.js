// What the client reads from getStats(): whether media arrives, how good each connection is, and whether the
// network has gone.

import { emit } from './errors.js';

/**
 * Whether media is really arriving through `receiver` (an RTCRtpReceiver of `track`): for video at least one
 * decoded frame, for audio at least one packet. Where the browser gives no stats, an unmuted track counts.
 */
export async function mediaArrives(receiver, track) {
  try {
    const stats = await receiver.getStats();
    let flowing = false;
    stats.forEach((report) => {
      if (report.type !== 'inbound-rtp') return;
      if (track.kind === 'video' ? report.framesDecoded > 0 : report.packetsReceived > 0) flowing = true;
    });
    return flowing;
  } catch {
    return !track.muted;
  }
}

// One getStats() sweep of every peer connection a second: a cut network must show within 3 s (it is seen at the
// first sweep STALL_MS after the last packet), and a handful of getStats() calls a second cost little next to
// decoding the video. ICE consent alone says `disconnected` only 5-6 s into a cut.
export const SWEEP_MS = 1000;
export const STALL_MS = 1200;
// A connection carrying at least this much (audio alone is ~5 kB/s) goes silent only when the network does;
// a quieter one (the SFU's publish connection: feedback only) is not watched for silence.
const BUSY_BYTES_PER_S = 2000;

export const GRADES = Object.freeze(['good', 'fair', 'poor']);

/** The worse of two grades (null: not known). */
function worse(a, b) {
  if (!a) return b;
  if (!b) return a;
  return GRADES.indexOf(a) >= GRADES.indexOf(b) ? a : b;
}

/** `loss`: fraction of packets lost; `rtt`, `jitter`: seconds. Thresholds of the usual VoIP quality bands. */
export function grade({ loss = 0, rtt = 0, jitter = 0 }) {
  if (loss >= 0.08 || rtt >= 0.6 || jitter >= 0.1) return 'poor';
  if (loss >= 0.02 || rtt >= 0.3 || jitter >= 0.03) return 'fair';
  return 'good';
}

/**
 * Watches the peer connections of `client` (a HuddleClient) while it is in a call: a grade per remote
 * participant (from their media as it arrives: loss, jitter, frames decoded against packets received; in p2p
 * mode also the round trip to them), one for ourselves (round trips, what the far ends say they lose of ours,
 * what we lose of theirs), and whether our network is lost (every busy connection silent, or ICE disconnected
 * on all of them).
 *
 * Event `update` {participants: Map(id -> grade), self: grade | null, lost} after every sweep.
 */
export class ConnectionMonitor extends EventTarget {
  constructor(client) {
    super();
    this._client = client;
    this._timer = null;
    this._sweeping = false;
    this._samples = new WeakMap(); // RTCPeerConnection -> the previous sweep's figures
    this._owners = new Map(); // remote track id -> participant id
    this.participants = new Map();
    this.self = null;
    this.lost = false;
    client.addEventListener('track', (event) => this._owners.set(event.detail.track.id, event.detail.participantId));
    client.addEventListener('state', (event) => {
      const inCall = event.detail.state === 'connected' || event.detail.state === 'reconnecting';
      if (inCall) this._start();
      else this._stop();
    });
  }

  _start() {
    if (this._timer) return;
    this._timer = setInterval(() => this._sweep(), SWEEP_MS);
  }

  _stop() {
    clearInterval(this._timer);
    this._timer = null;
    this._owners.clear();
    this._report(new Map(), null, false);
  }

  _report(participants, self, lost) {
    this.participants = participants;
    this.self = self;
    this.lost = lost;
    emit(this, 'update', { participants, self, lost });
  }

  async _sweep() {
    if (this._sweeping) return; // a slow machine: never two sweeps at once
    this._sweeping = true;
    try {
      const connections = this._client.peerConnections().filter(({ pc }) => pc.connectionState !== 'closed');
      const read = await Promise.all(connections.map(async ({ participantId, pc }) => {
        try {
          return { participantId, pc, stats: await pc.getStats() };
        } catch {
          return null; // closed meanwhile
        }
      }));
      if (!this._timer) return;
      const participants = new Map();
      let self = null;
      const watched = [];
      let iceDown = connections.length > 0;
      for (const entry of read) {
        if (!entry) continue;
        const figures = this._read(entry);
        for (const [id, g] of figures.participants) participants.set(id, worse(participants.get(id), g));
        self = worse(self, figures.self);
        if (figures.busy) watched.push(figures.stalled);
        if (!['disconnected', 'failed'].includes(entry.pc.iceConnectionState)) iceDown = false;
      }
      const lost = (watched.length > 0 && watched.every(Boolean)) || iceDown;
      if (lost) self = 'poor';
      this._report(participants, self, lost);
    } finally {
      this._sweeping = false;
    }
  }

  /** One connection's grades, and whether it is busy and stalled, from this sweep and its previous one. */
  _read({ participantId, pc, stats }) {
    const previous = this._samples.get(pc) || { inbound: new Map(), busy: false };
    const byId = new Map();
    stats.forEach((report) => byId.set(report.id, report));
    const now = performance.now();
    const seconds = previous.at ? Math.max(0.1, (now - previous.at) / 1000) : 0;
    const p2p = !String(participantId).startsWith('sfu:');

    let bytes = 0;
    let rtt = null;
    let idleMs = null;
    for (const report of byId.values()) {
      if (report.type !== 'transport') continue;
      bytes += report.bytesReceived || 0;
      const pair = byId.get(report.selectedCandidatePairId);
      if (!pair) continue;
      if (Number.isFinite(pair.currentRoundTripTime)) rtt = Math.max(rtt || 0, pair.currentRoundTripTime);
      if (pair.lastPacketReceivedTimestamp > 0) idleMs = Math.max(0, pair.timestamp - pair.lastPacketReceivedTimestamp);
    }
    // Where the browser gives no last-packet time: silent since the bytes last moved.
    const lastMoved = bytes !== previous.bytes || !previous.lastMoved ? now : previous.lastMoved;
    if (idleMs === null) idleMs = now - lastMoved;
    const rate = seconds ? (bytes - previous.bytes) / seconds : 0;
    const stalled = idleMs > STALL_MS;
    const busy = previous.busy || rate >= BUSY_BYTES_PER_S;

    const participants = new Map();
    let lostIn = 0;
    let receivedIn = 0;
    let self = rtt === null ? null : grade({ rtt });
    const inbound = new Map();
    for (const report of byId.values()) {
      if (report.type === 'remote-inbound-rtp') {
        // How the far end receives what we send.
        self = worse(self, grade({ loss: report.fractionLost || 0, rtt: report.roundTripTime || 0 }));
        continue;
      }
      if (report.type !== 'inbound-rtp') continue;
      const owner = this._owners.get(report.trackIdentifier) || (p2p ? participantId : null);
      const counts = {
        received: report.packetsReceived || 0, lost: Math.max(0, report.packetsLost || 0),
        frames: report.framesDecoded || 0,
      };
      inbound.set(report.id, counts);
      const before = previous.inbound.get(report.id);
      if (!owner || !before || !seconds) continue;
      const received = counts.received - before.received;
      const lost = Math.max(0, counts.lost - before.lost);
      lostIn += lost;
      receivedIn += received;
      const figures = { jitter: report.kind === 'audio' ? report.jitter || 0 : 0 };
      if (received + lost >= 10) figures.loss = lost / (received + lost);
      if (p2p && rtt !== null) figures.rtt = rtt;
      let g = grade(figures);
      // Packets come but hardly a frame is decoded out of them: frozen video.
      if (report.kind === 'video' && received / seconds >= 20 && (counts.frames - before.frames) / seconds < 3) g = 'poor';
      if (stalled && busy) g = 'poor';
      participants.set(owner, worse(participants.get(owner), g));
    }
    if (lostIn + receivedIn >= 10) self = worse(self, grade({ loss: lostIn / (lostIn + receivedIn) }));
    this._samples.set(pc, { at: now, bytes, lastMoved, busy, inbound });
    return { participants, self, busy, stalled };
  }
}
