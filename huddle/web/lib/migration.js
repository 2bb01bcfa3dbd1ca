// Moving a call p2p -> sfu without blanking a tile: each P2P connection that carries media stays until that
// participant's media flows through the SFU (or a time limit).

import { SfuTransport } from './sfu.js';

// A participant's P2P connection is kept until their media flows through the SFU, at most MIGRATION_WAIT_MS
// after their first SFU track arrived (MIGRATION_CAP_MS after the switch when none arrives), and for
// MIGRATION_LINGER_MS more so that the other side (switching at about the same moment) keeps receiving us
// until its own SFU copy of us flows.
const MIGRATION_WAIT_MS = 5000;
const MIGRATION_CAP_MS = 15000;
const MIGRATION_LINGER_MS = 1500;
const MIGRATION_POLL_MS = 100;

/**
 * The retirement of `mesh` (the MeshTransport the call moves away from), which has retired already and still
 * has links. The client it works for (`host`) gives it:
 *   transport()              the client's current transport (the SFU's, unless the call moved on again)
 *   finished(participantId)  that participant's tile is to show their SFU media from now on
 *   done()                   every P2P connection is closed: this migration is over
 */
export class Migration {
  constructor(mesh, host) {
    this.mesh = mesh;
    this.host = host;
    this.closed = false;
    this._waiting = new Map(); // participant id -> {participantId, expectVideo, since, trackSince}
    this._checking = false;
    const since = performance.now();
    for (const participantId of mesh.links.keys()) {
      const tracks = mesh.remoteTracks(participantId);
      this._waiting.set(participantId, {
        participantId, since, trackSince: null, expectVideo: tracks.some((t) => t.kind === 'video'),
      });
    }
    this._timer = setInterval(() => this._check(), MIGRATION_POLL_MS);
  }

  /** Whether `participantId`'s tile still shows their P2P media (their SFU media does not flow yet). */
  waitsFor(participantId) {
    return this._waiting.has(participantId);
  }

  connections() {
    return this.mesh.connections();
  }

  /** `participantId` left the call. */
  remove(participantId) {
    this.mesh.remove(participantId);
    this._waiting.delete(participantId);
  }

  close() {
    this.closed = true;
    clearInterval(this._timer);
    this._timer = null;
    this._waiting.clear();
    this.mesh.close();
  }

  async _check() {
    if (this._checking) return;
    this._checking = true;
    try {
      const sfu = this.host.transport();
      if (!(sfu instanceof SfuTransport) || this.closed) return;
      for (const migration of [...this._waiting.values()]) {
        const { participantId } = migration;
        const now = performance.now();
        const stream = sfu.streams.get(participantId);
        let ready = false;
        if (stream && stream.getTracks().length > 0) {
          if (migration.trackSince === null) migration.trackSince = now;
          const wanted = migration.expectVideo ? stream.getVideoTracks() : stream.getTracks();
          for (const track of wanted) {
            if (await sfu.hasMedia(track)) {
              ready = true;
              break;
            }
          }
        }
        if (this._waiting.get(participantId) !== migration || this.host.transport() !== sfu) continue;
        const link = this.mesh.links.get(participantId);
        const p2pGone = !link || link.closed || ['failed', 'closed'].includes(link.pc.connectionState);
        const waited = migration.trackSince !== null && now - migration.trackSince >= MIGRATION_WAIT_MS;
        if (ready || p2pGone || waited || now - migration.since >= MIGRATION_CAP_MS) {
          this._finish(participantId, Boolean(stream && stream.getTracks().length));
        }
      }
    } finally {
      this._checking = false;
    }
  }

  /** The participant's tile moves to their SFU stream; their P2P connection closes shortly after. */
  _finish(participantId, haveSfuMedia) {
    this._waiting.delete(participantId);
    this.host.finished(participantId);
    // The other side switches at about the same moment; a moment more of our P2P media covers its switch.
    setTimeout(() => {
      if (this.closed || this._waiting.has(participantId)) return;
      this.mesh.remove(participantId);
      if (this.mesh.links.size > 0 || this._waiting.size > 0) return;
      this.close();
      this.host.done();
    }, haveSfuMedia ? MIGRATION_LINGER_MS : 0);
  }
}
