// Huddle browser SDK: signaling, local media and peer connections. No DOM or UI code lives here.
//
// Three layers, each replaceable on its own:
//   SignalingChannel  one WebSocket: JSON frames, request ids, ping every 5 s, 12 s of silence = lost.
//   MeshTransport     "p2p" mode: one RTCPeerConnection (PeerLink) per remote participant.
//   SfuTransport      "sfu" mode: two RTCPeerConnections with the server (publish: ours; subscribe: everyone else's).
//   HuddleClient      the public API: joins a room, owns local media, turns all of it into events.
// Both transports have the same small interface (start, connectTo, expect, handleSignal, remove, close,
// connections, restartIce); HuddleClient moves a call from one to the other (p2p -> sfu) without blanking a
// tile, and resumes the call on a new socket when the signaling socket drops (reconnection).
//
// Protocol: docs/protocol.md (version 1).

export const PROTOCOL_VERSION = 1;
export const ROOM_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
export const STATES = Object.freeze(['idle', 'connecting', 'connected', 'reconnecting', 'disconnected', 'error']);

const PING_INTERVAL_MS = 5000;
const SILENCE_TIMEOUT_MS = 12000;
const MEDIA_CONSTRAINTS = Object.freeze({ audio: true, video: { width: 1280, height: 720 } });
// A P2P or SFU connection whose ICE failed restarts ICE (a new offer with fresh credentials), at most this
// many times in a row: the new round gathers again, so a TURN allocation that failed the first time (a lost
// Allocate, a stale nonce) gets another chance. With every server in `ice_servers`, ICE pairs direct
// candidates first (by priority) and relayed ones last, so TURN carries the call only where nothing else works.
const MAX_ICE_RESTARTS = 3;
// iceTransportPolicy values (RTCConfiguration).
const ICE_ALL = 'all';
const ICE_RELAY = 'relay';
const CLOSE_UNAUTHORIZED = 4001; // token refused: reconnecting cannot help
const CLOSE_REPLACED = 4002; // the server's close code when the same identity joined again elsewhere
const CLOSE_REMOVED = 4004; // the server removed this participant (e.g. its media timed out)
const CLOSE_DROPPED = 4000; // our own code for a socket we gave up on (no word from the server)
const CLOSE_SERVICE_RESTART = 1012; // the node stops serving its calls: resume at once, elsewhere if we can
// Reconnection: waits before each round of attempts to open a new socket, the last one repeating until the
// grace period (`reconnect_grace` from `joined`) is over. A round tries each door (`doors` from `joined`) in
// turn, the next one as soon as the one before failed. One attempt may take at most RESUME_ATTEMPT_MS.
const RECONNECT_DELAYS_MS = Object.freeze([500, 1000, 2000]);
// `redirect` answers that one `join` may follow (docs/protocol.md, "redirect").
const MAX_REDIRECTS = 3;
const RESUME_ATTEMPT_MS = 5000;
// A door that sends our resume on to a node we cannot reach is most likely sending it to the node we lost,
// whose standby takes the call over as soon as ZooKeeper ends the dead node's session (a second or two).
// That door learns of the takeover at once, so it is asked again after this short wait (plus up to
// REDIRECT_RETRY_JITTER_MS, so that a whole call does not come back in step) rather than after the growing
// backoff, which would add seconds to every failover. At most REDIRECT_RETRIES_MAX such quick tries per
// reconnection (about 10 s, past the default 6 s session timeout); then the backoff as usual.
const REDIRECT_RETRY_MS = 200;
const REDIRECT_RETRY_JITTER_MS = 100;
const REDIRECT_RETRIES_MAX = 40;
const RESUME_LAST_MARGIN_MS = 250;
const DEFAULT_RECONNECT_GRACE_S = 20;
// Moving a call p2p -> sfu: a participant's P2P connection is kept until their media flows through the SFU,
// at most MIGRATION_WAIT_MS after their first SFU track arrived (MIGRATION_CAP_MS after the switch when none
// arrives), and for MIGRATION_LINGER_MS more so that the other side (switching at about the same moment)
// keeps receiving us until its own SFU copy of us flows.
const MIGRATION_WAIT_MS = 5000;
const MIGRATION_CAP_MS = 15000;
const MIGRATION_LINGER_MS = 1500;
const MIGRATION_POLL_MS = 100;
// SFU mode: the camera is published as three simulcast encodings (docs/protocol.md, "Simulcast publishing"),
// lowest first. The server turns them on and off with `publisher_layers` (dynacast).
export const SIMULCAST_ENCODINGS = Object.freeze([
  Object.freeze({ rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 }),
  Object.freeze({ rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 }),
  Object.freeze({ rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 1_500_000 }),
]);
// Each simulcast layer keeps its size (the SFU chooses layers by size): when bandwidth or CPU run short, the
// browser lowers the frame rate or turns top layers off, rather than shrinking a layer. Without this, a lone
// active `f` started while the bandwidth estimate was low stayed at 480x270 for many seconds (Chromium 156).
const SIMULCAST_DEGRADATION = 'maintain-resolution';
// `video_sizes` goes out at most this often (docs/protocol.md, "video_sizes").
const VIDEO_SIZES_INTERVAL_MS = 250;
const VIDEO_SIZES_ID_PREFIX = 'video-sizes-';
// Request ids of `start_recording` / `stop_recording`: the message type, '-', a number. The `error` event of a
// refused one names the request (detail.request), even when it comes after the request was settled.
const RECORDING_ID_PATTERN = /^(start_recording|stop_recording)-\d+$/;

/** An error with a protocol code (`code`) as well as words for people (`message`). */
export class HuddleError extends Error {
  constructor(code, message, { source = 'local', fatal = false, requestId = undefined, cause } = {}) {
    super(message, cause ? { cause } : undefined);
    this.name = 'HuddleError';
    this.code = code;
    this.source = source; // 'server' | 'local'
    this.fatal = fatal;
    this.requestId = requestId;
  }
}

/** Display names as the server accepts them: white space collapsed, 1-64 characters. */
export function cleanDisplayName(name) {
  if (typeof name !== 'string') return null;
  const cleaned = name.trim().split(/\s+/).join(' ');
  return cleaned.length >= 1 && cleaned.length <= 64 ? cleaned : null;
}

export function defaultSignalingUrl() {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}/ws`;
}

/** A WebSocket URL from the server (`redirect`, `doors`), normalised; null for anything else. */
function cleanSignalingUrl(url) {
  if (typeof url !== 'string') return null;
  try {
    const parsed = new URL(url);
    return parsed.protocol === 'ws:' || parsed.protocol === 'wss:' ? parsed.href : null;
  } catch {
    return null;
  }
}

function emit(target, type, detail) {
  target.dispatchEvent(new CustomEvent(type, { detail }));
}

// ---------------------------------------------------------------------------------------------------------
// Signaling

/**
 * One WebSocket speaking the Huddle protocol. Events: `message` (detail: the parsed server message) for every
 * frame, and `close` (detail: {code, reason, lost, wasOpen}) once, when the socket is gone for any reason.
 */
export class SignalingChannel extends EventTarget {
  constructor(url, { pingInterval = PING_INTERVAL_MS, silenceTimeout = SILENCE_TIMEOUT_MS } = {}) {
    super();
    this.url = url;
    this.pingInterval = pingInterval;
    this.silenceTimeout = silenceTimeout;
    this.ws = null;
    this.lastMessageAt = 0;
    this.rttMs = null;
    this._nextId = 1;
    this._pending = new Map(); // request id -> {resolve, reject, sentAt}
    this._timers = [];
    this._closed = false;
    this._wasOpen = false;
    this._rejectOpen = null;
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /** Opens the socket; resolves once it is open, rejects when it cannot be opened. */
  open() {
    return new Promise((resolve, reject) => {
      this._rejectOpen = reject;
      let ws;
      try {
        ws = new WebSocket(this.url);
      } catch (err) {
        reject(new HuddleError('connection_failed', `cannot open ${this.url}: ${err.message}`, { cause: err }));
        return;
      }
      this.ws = ws;
      ws.onopen = () => {
        this._wasOpen = true;
        this.lastMessageAt = performance.now();
        this._startHeartbeat();
        resolve();
      };
      ws.onmessage = (event) => this._onFrame(event.data);
      ws.onerror = () => {
        // A close event always follows; it carries the details.
      };
      ws.onclose = (event) => this._finish({ code: event.code, reason: event.reason, lost: false });
    });
  }

  /** Sends one message; returns false when the socket is not open. */
  send(message) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(message));
    return true;
  }

  /**
   * Sends a message with a fresh request id and resolves with the server's reply carrying that id. An `error`
   * reply rejects with a HuddleError (source 'server'); so does the socket closing first.
   */
  request(message) {
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      if (!this.send({ ...message, id })) {
        reject(new HuddleError('connection_lost', 'not connected to the server'));
        return;
      }
      this._pending.set(id, { resolve, reject, sentAt: performance.now() });
    });
  }

  /** Closes the socket from this side. */
  close(code = 1000, reason = '') {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) {
      try {
        this.ws.close(code, reason);
      } catch {
        this.ws.close();
      }
    }
    this._finish({ code, reason, lost: false });
  }

  /**
   * Abandons the socket at once, as a lost network would: no `leave`, no waiting for the closing handshake.
   * The `close` event (lost: true) fires before this returns.
   */
  drop(reason = 'connection dropped') {
    const ws = this.ws;
    this._finish({ code: CLOSE_DROPPED, reason, lost: true });
    try {
      if (ws && ws.readyState <= WebSocket.OPEN) ws.close(CLOSE_DROPPED, reason);
    } catch {
      // already closing
    }
  }

  _onFrame(data) {
    this.lastMessageAt = performance.now();
    if (typeof data !== 'string') return;
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    if (message === null || typeof message !== 'object' || typeof message.type !== 'string') return;
    emit(this, 'message', message);
    if (message.id !== undefined && message.id !== null && this._pending.has(message.id)) {
      const pending = this._pending.get(message.id);
      this._pending.delete(message.id);
      if (message.type === 'error') {
        pending.reject(new HuddleError(message.code, message.message || message.code, {
          source: 'server', requestId: message.id,
        }));
      } else {
        if (message.type === 'pong') this.rttMs = performance.now() - pending.sentAt;
        pending.resolve(message);
      }
    }
  }

  _startHeartbeat() {
    this._timers.push(setInterval(() => {
      // Pongs need no waiting for: any frame from the server counts as a sign of life.
      if (this.isOpen) {
        const id = this._nextId++;
        this._pending.set(id, { resolve: () => {}, reject: () => {}, sentAt: performance.now() });
        this.send({ type: 'ping', id });
      }
    }, this.pingInterval));
    this._timers.push(setInterval(() => {
      if (performance.now() - this.lastMessageAt > this.silenceTimeout) this.drop('no message from the server');
    }, Math.min(1000, this.silenceTimeout / 4)));
  }

  _finish({ code, reason, lost }) {
    if (this._closed) return;
    this._closed = true;
    if (!this._wasOpen && this._rejectOpen) {
      this._rejectOpen(new HuddleError('connection_failed', 'could not reach the Huddle server'));
    }
    this._rejectOpen = null;
    for (const timer of this._timers) clearInterval(timer);
    this._timers = [];
    if (this.ws) {
      this.ws.onopen = this.ws.onmessage = this.ws.onclose = this.ws.onerror = null;
    }
    const error = new HuddleError('connection_lost', 'the connection to the server was closed');
    for (const pending of this._pending.values()) pending.reject(error);
    this._pending.clear();
    emit(this, 'close', { code, reason, lost, wasOpen: this._wasOpen });
  }
}

// ---------------------------------------------------------------------------------------------------------
// Peer-to-peer mesh

/** Which way media flows on one m-section, from this side's point of view. */
function direction(send, receive) {
  if (send && receive) return 'sendrecv';
  if (send) return 'sendonly';
  if (receive) return 'recvonly';
  return 'inactive';
}

/**
 * One RTCPeerConnection to one remote participant. The `initiator` (the later joiner) sends the offers; the
 * other side answers. Every incoming signal goes through one queue, so descriptions and candidates are applied
 * in the order they arrived; candidates that come before a remote description wait for it.
 */
class PeerLink {
  constructor({
    participantId, initiator, iceServers, iceTransportPolicy, localTracks, publish, subscribe, send, events,
  }) {
    this.participantId = participantId;
    this.initiator = initiator;
    this.localTracks = localTracks; // {audio: MediaStreamTrack|null, video: ..., stream: MediaStream|null}
    this.publish = publish;
    this.subscribe = subscribe;
    this.send = send;
    this.events = events;
    this.remoteStream = new MediaStream();
    this.pendingCandidates = [];
    this.iceRestarts = 0;
    this.closed = false;
    this.retired = false; // the call moved to the SFU: this link only carries media until it is closed
    this._queue = Promise.resolve();

    const pc = new RTCPeerConnection({ iceServers, iceTransportPolicy });
    this.pc = pc;
    pc.onicecandidate = (event) => this._onLocalCandidate(event.candidate);
    pc.ontrack = (event) => this._onTrack(event);
    pc.onconnectionstatechange = () => this._onStateChange();
    pc.oniceconnectionstatechange = () => this._onStateChange();
  }

  /** The initiator sets up its transceivers and sends the first offer. */
  start() {
    if (!this.initiator) return;
    this._enqueue(async () => {
      await this._addInitiatorTransceivers();
      await this._sendOffer(false);
    });
  }

  async _addInitiatorTransceivers() {
    for (const kind of ['audio', 'video']) {
      const track = this.publish ? this.localTracks[kind] : null;
      const init = { direction: direction(Boolean(track), this.subscribe) };
      if (track && this.localTracks.stream) init.streams = [this.localTracks.stream];
      this.pc.addTransceiver(track || kind, init);
    }
  }

  handleSignal(message) {
    this._enqueue(async () => {
      if (message.type === 'offer') await this._onOffer(message.sdp);
      else if (message.type === 'answer') await this._onAnswer(message.sdp);
      else if (message.type === 'candidate') await this._onRemoteCandidate(message.candidate);
    });
  }

  /**
   * ICE restart after our signaling came back (reconnection): the initiator sends a new offer with fresh ICE
   * credentials, first dropping an offer of ours whose answer was lost with the old socket.
   */
  restartIce() {
    if (!this.initiator || this.retired) return;
    this._enqueue(async () => {
      if (this.pc.signalingState === 'have-local-offer') await this.pc.setLocalDescription({ type: 'rollback' });
      if (this.pc.signalingState === 'stable') await this._sendOffer(true);
    });
  }

  /** The call moved to the SFU: no more signaling on this link (the server would refuse it), no ICE restarts. */
  retire() {
    this.retired = true;
    this.send = () => false;
  }

  /** Whether any media track arrived over this link. */
  get hasRemoteMedia() {
    return this.remoteStream.getTracks().length > 0;
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    this.pc.onicecandidate = this.pc.ontrack = null;
    this.pc.onconnectionstatechange = this.pc.oniceconnectionstatechange = null;
    this.pc.close();
    for (const track of this.remoteStream.getTracks()) track.stop();
    this.events.peerState(this.participantId, {
      connectionState: 'closed', iceConnectionState: 'closed', state: 'closed',
    });
  }

  _enqueue(task) {
    this._queue = this._queue.then(async () => {
      if (this.closed) return;
      try {
        await task();
      } catch (err) {
        if (!this.closed) {
          this.events.error(new HuddleError('peer_error',
            `connection to ${this.participantId} failed: ${err.message}`, { cause: err }));
        }
      }
    });
  }

  async _sendOffer(iceRestart) {
    const offer = await this.pc.createOffer(iceRestart ? { iceRestart: true } : undefined);
    await this.pc.setLocalDescription(offer);
    this.send({ type: 'offer', to: this.participantId, sdp: this.pc.localDescription.sdp });
  }

  async _onOffer(sdp) {
    if (this.pc.signalingState !== 'stable') {
      // Only the initiator offers, so this is rare (an offer of ours crossed theirs); theirs wins.
      await this.pc.setLocalDescription({ type: 'rollback' });
    }
    await this.pc.setRemoteDescription({ type: 'offer', sdp });
    await this._configureAnswerTransceivers();
    await this._flushCandidates();
    const answer = await this.pc.createAnswer();
    await this.pc.setLocalDescription(answer);
    this.send({ type: 'answer', to: this.participantId, sdp: this.pc.localDescription.sdp });
  }

  /** On the answering side: put the local tracks on the transceivers the offer created. */
  async _configureAnswerTransceivers() {
    for (const transceiver of this.pc.getTransceivers()) {
      if (transceiver.mid === null || transceiver.stopped || transceiver.currentDirection !== null) continue;
      const kind = transceiver.receiver.track.kind;
      const track = this.publish ? this.localTracks[kind] || null : null;
      if (track) {
        await transceiver.sender.replaceTrack(track);
        if (this.localTracks.stream && transceiver.sender.setStreams) {
          transceiver.sender.setStreams(this.localTracks.stream);
        }
      }
      transceiver.direction = direction(Boolean(track), this.subscribe);
    }
  }

  async _onAnswer(sdp) {
    if (this.pc.signalingState !== 'have-local-offer') return; // stale or duplicate answer
    await this.pc.setRemoteDescription({ type: 'answer', sdp });
    await this._flushCandidates();
  }

  async _onRemoteCandidate(candidate) {
    if (!this.pc.remoteDescription) {
      this.pendingCandidates.push(candidate);
      return;
    }
    await this._addCandidate(candidate);
  }

  async _flushCandidates() {
    const queued = this.pendingCandidates;
    this.pendingCandidates = [];
    for (const candidate of queued) await this._addCandidate(candidate);
  }

  async _addCandidate(candidate) {
    try {
      // null means end of candidates, which addIceCandidate() without a candidate signals.
      if (candidate) await this.pc.addIceCandidate(candidate);
      else await this.pc.addIceCandidate();
    } catch (err) {
      // A candidate of an earlier ICE generation, or one this browser cannot use: not fatal.
      if (candidate) console.debug('huddle: ignored remote candidate', candidate.candidate, err.message);
    }
  }

  _onLocalCandidate(candidate) {
    let init = null;
    if (candidate && candidate.candidate) {
      init = { candidate: candidate.candidate, sdpMid: candidate.sdpMid, sdpMLineIndex: candidate.sdpMLineIndex };
      if (candidate.usernameFragment) init.usernameFragment = candidate.usernameFragment;
    }
    this.send({ type: 'candidate', to: this.participantId, candidate: init });
  }

  _onTrack(event) {
    const { track } = event;
    if (!this.remoteStream.getTracks().includes(track)) {
      // One stream per participant, whatever stream ids the other side used (or none).
      for (const old of this.remoteStream.getTracks()) {
        if (old.kind === track.kind) this.remoteStream.removeTrack(old);
      }
      this.remoteStream.addTrack(track);
    }
    this.events.track(this.participantId, this.remoteStream, track);
  }

  _onStateChange() {
    const { connectionState, iceConnectionState } = this.pc;
    this.events.peerState(this.participantId, { connectionState, iceConnectionState, state: connectionState });
    if (connectionState === 'failed' && this.initiator && !this.retired && this.iceRestarts < MAX_ICE_RESTARTS) {
      this.iceRestarts += 1;
      this._enqueue(async () => {
        if (this.pc.signalingState === 'stable') await this._sendOffer(true);
      });
    } else if (connectionState === 'connected') {
      this.iceRestarts = 0;
    }
  }
}

/**
 * What both transports are given: ICE servers and policy ('relay': TURN candidates only), local tracks,
 * permissions, and how to signal and report.
 */
class Transport {
  constructor({ iceServers, iceTransportPolicy = ICE_ALL, localTracks, permissions, send, events }) {
    this.iceServers = iceServers || [];
    this.iceTransportPolicy = iceTransportPolicy;
    this.localTracks = localTracks;
    this.publish = permissions?.publish !== false;
    this.subscribe = permissions?.subscribe !== false;
    this.send = send;
    this.events = events;
  }
}

/**
 * "p2p" mode: a full mesh of PeerLinks, one per remote participant. The later joiner offers (connectTo);
 * everyone already present waits for that offer (expect).
 */
export class MeshTransport extends Transport {
  constructor(options) {
    super(options);
    this.links = new Map(); // participant id -> PeerLink
    this.retired = false;
  }

  get mode() {
    return 'p2p';
  }

  start() {}

  /** We joined after `participantId`: we offer. */
  connectTo(participantId) {
    if (this.retired) return;
    this._link(participantId, true).start();
  }

  /** `participantId` joined after us: they will offer. */
  expect(participantId) {
    if (this.retired) return;
    this._link(participantId, false);
  }

  /** An offer, answer or candidate from another participant (`from`). */
  handleSignal(message) {
    if (this.retired) return;
    const from = message.from;
    if (typeof from !== 'string') return;
    let link = this.links.get(from);
    if (!link) {
      if (message.type !== 'offer') return; // nothing to attach it to
      link = this._link(from, false);
    }
    link.handleSignal(message);
  }

  remove(participantId) {
    const link = this.links.get(participantId);
    if (!link) return;
    this.links.delete(participantId);
    link.close();
  }

  close() {
    for (const id of [...this.links.keys()]) this.remove(id);
  }

  connections() {
    return [...this.links.values()].map((link) => ({ participantId: link.participantId, pc: link.pc }));
  }

  /** After our signaling came back: restart ICE on every link we initiated (the later joiner restarts). */
  restartIce(participantId) {
    for (const link of this.links.values()) {
      if (participantId === undefined || link.participantId === participantId) link.restartIce();
    }
  }

  /** The call moved to the SFU: links only carry media from now on; links that never carried any close. */
  retire() {
    this.retired = true;
    for (const link of [...this.links.values()]) {
      link.retire();
      if (!link.hasRemoteMedia) this.remove(link.participantId);
    }
  }

  /** The tracks received from `participantId` over this mesh (empty when there is no such link). */
  remoteTracks(participantId) {
    const link = this.links.get(participantId);
    return link && !link.closed ? link.remoteStream.getTracks() : [];
  }

  has(participantId) {
    return this.links.has(participantId);
  }

  _link(participantId, initiator) {
    this.remove(participantId);
    const link = new PeerLink({
      participantId,
      initiator,
      iceServers: this.iceServers,
      iceTransportPolicy: this.iceTransportPolicy,
      localTracks: this.localTracks,
      publish: this.publish,
      subscribe: this.subscribe,
      send: this.send,
      events: this.events,
    });
    this.links.set(participantId, link);
    return link;
  }
}

// ---------------------------------------------------------------------------------------------------------
// SFU

/** The participant ids under which SfuTransport.connections() lists its two peer connections. */
export const SFU_PUBLISH_ID = 'sfu:publish';
export const SFU_SUBSCRIBE_ID = 'sfu:subscribe';

/**
 * "sfu" mode (docs/protocol.md, "SFU mode"): two RTCPeerConnections with the server, so that neither side
 * ever waits for the other's offer.
 *   publish    we offer (`sfu_offer` pc "publish") our microphone and camera as sendonly transceivers: audio
 *              as one encoding, the camera as three simulcast encodings (rid q, h, f: 1/4, 1/2 and full size);
 *              the server answers (`sfu_answer`). Offered again when the local tracks change and for ICE
 *              restarts, one offer at a time. `publisher_layers` from the server pauses and resumes the
 *              camera's encodings (setPublisherLayers). Each encoding keeps its size (degradationPreference
 *              'maintain-resolution'), so that a rid always means the same resolution to the SFU.
 *   subscribe  the server offers (`sfu_offer` pc "subscribe" with a `revision`) one sendonly m-section per
 *              remote track; we answer (`sfu_answer`, same revision). Offers are applied strictly in order.
 * The server is ICE-lite and learns our address from our STUN checks: no candidates go either way. With
 * iceTransportPolicy 'relay' those checks (and the media) come from our TURN allocation, so the address it
 * learns is the relay's; over ICE-TCP or TURN over TCP/TLS a browser whose UDP is blocked still gets through.
 *
 * Remote tracks are grouped by the stream id of their msid (= the publishing participant's id) into one
 * MediaStream per participant holding their audio and video, reported with the same `track` events as
 * MeshTransport. A track goes again (event `trackRemoved`) when the server's offer makes its m-section
 * inactive or rejects it (port 0), when it ends, or when its msid stream loses it.
 */
export class SfuTransport extends Transport {
  constructor(options) {
    super(options);
    this.publishPc = null;
    this.subscribePc = null;
    this.closed = false;
    this.revision = null; // of the last subscribe offer applied
    this.streams = new Map(); // participant id -> MediaStream (what the page shows)
    this._owners = new Map(); // remote MediaStreamTrack -> participant id
    this._watched = new WeakSet(); // tracks and msid streams we listen to already
    this._publishQueue = Promise.resolve();
    this._subscribeQueue = Promise.resolve();
    this._offerOut = false; // a publish offer waits for its answer
    this._wanted = null; // {iceRestart}: another publish offer is due once the answer is in
    this._offers = 0;
    this._iceRestarts = 0;
    this._layersWanted = null; // Set of rids the server wants on (publisher_layers); null = all of them
    this._layersBusy = false; // a getParameters/setParameters round is running
    this._degraded = new WeakSet(); // senders given SIMULCAST_DEGRADATION
  }

  get mode() {
    return 'sfu';
  }

  /** The camera's simulcast layers the server last asked for (null: none asked yet, all are on). */
  get publisherLayers() {
    return this._layersWanted ? [...this._layersWanted] : null;
  }

  start() {
    if (this.publishPc) return;
    const config = {
      iceServers: this.iceServers, iceTransportPolicy: this.iceTransportPolicy, bundlePolicy: 'max-bundle',
    };
    const pub = new RTCPeerConnection(config);
    const sub = new RTCPeerConnection(config);
    this.publishPc = pub;
    this.subscribePc = sub;
    // No onicecandidate: the ICE-lite server needs none of our candidates.
    pub.onconnectionstatechange = () => this._onPublishState();
    pub.oniceconnectionstatechange = () => this._onPublishState();
    sub.ontrack = (event) => this._onTrack(event);
    sub.onconnectionstatechange = () => this._onSubscribeState();
    sub.oniceconnectionstatechange = () => this._onSubscribeState();
    this._enqueuePublish(async () => this._syncPublishTransceivers());
    this._negotiatePublish(false);
  }

  /** Remote tracks are announced as they come; a participant we hear of later gets theirs again. */
  connectTo(participantId) {
    this._announce(participantId);
  }

  expect(participantId) {
    this._announce(participantId);
  }

  /** `sfu_offer` (subscribe), `sfu_answer` (publish), and `error` replies to our own SFU messages. */
  handleSignal(message) {
    if (this.closed) return;
    if (message.type === 'sfu_offer' && message.pc === 'subscribe') this._applySubscribeOffer(message);
    else if (message.type === 'sfu_answer' && message.pc === 'publish') this._applyPublishAnswer(message.sdp);
    else if (message.type === 'error') this._onError(message);
  }

  /** The participant left: forget their stream (the server's next offer retires their m-sections). */
  remove(participantId) {
    this.streams.delete(participantId);
    for (const [track, owner] of [...this._owners]) if (owner === participantId) this._owners.delete(track);
  }

  close() {
    if (this.closed) return;
    this.closed = true;
    for (const pc of [this.publishPc, this.subscribePc]) {
      if (!pc) continue;
      pc.ontrack = pc.onconnectionstatechange = pc.oniceconnectionstatechange = null;
      pc.close();
    }
    this.streams.clear();
    this._owners.clear();
  }

  connections() {
    const out = [];
    if (this.publishPc) out.push({ participantId: SFU_PUBLISH_ID, pc: this.publishPc });
    if (this.subscribePc) out.push({ participantId: SFU_SUBSCRIBE_ID, pc: this.subscribePc });
    return out;
  }

  /**
   * ICE restart of the publish connection (after our signaling came back): a new offer with fresh ICE
   * credentials. An offer whose answer was lost with the old socket is dropped first. The subscribe side is
   * restarted by the server's next offer.
   */
  restartIce() {
    this._enqueuePublish(async () => {
      this._offerOut = false;
      this._wanted = null;
    });
    this._negotiatePublish(true);
  }

  /**
   * `publisher_layers` (dynacast): keep the camera's encodings whose rid is in `active` on, pause the others.
   * The calls to setParameters are serialised; wishes that come while one is running are merged into the
   * next round, so the last one wins.
   */
  setPublisherLayers(active) {
    if (!Array.isArray(active)) return;
    this._layersWanted = new Set(active.filter((rid) => typeof rid === 'string'));
    this._applySenderParameters();
  }

  /** New local tracks (e.g. a camera that came later): put them on the publish connection, offer again. */
  setLocalTracks(localTracks) {
    this.localTracks = localTracks;
    this._enqueuePublish(async () => {
      if (await this._syncPublishTransceivers()) this._negotiatePublish(false);
    });
  }

  /**
   * Whether media from the SFU is really arriving on `track`: for video at least one decoded frame, for audio
   * at least one packet.
   */
  async hasMedia(track) {
    if (!this.subscribePc || this.closed) return false;
    const transceiver = this.subscribePc.getTransceivers().find((t) => t.receiver.track === track);
    if (!transceiver) return false;
    try {
      const stats = await transceiver.receiver.getStats();
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

  /** The subscribe connection's state, in the form of `peer-state` events. */
  subscribeState() {
    const pc = this.subscribePc;
    const connectionState = pc ? pc.connectionState : 'new';
    const iceConnectionState = pc ? pc.iceConnectionState : 'new';
    return { connectionState, iceConnectionState, state: connectionState };
  }

  // --- publish ---

  _enqueuePublish(task) {
    this._publishQueue = this._publishQueue.then(async () => {
      if (this.closed) return;
      try {
        await task();
      } catch (err) {
        if (!this.closed) {
          this.events.error(new HuddleError('peer_error', `publishing to the server failed: ${err.message}`,
            { cause: err }));
        }
      }
    });
  }

  /** Puts the local tracks on sendonly transceivers; true when the offer has to change. */
  async _syncPublishTransceivers() {
    const pc = this.publishPc;
    let changed = false;
    for (const kind of ['audio', 'video']) {
      const track = this.publish ? this.localTracks?.[kind] || null : null;
      const transceiver = pc.getTransceivers().find((t) => t.receiver.track.kind === kind
        && t.currentDirection !== 'stopped' && t.direction !== 'stopped');
      if (!transceiver) {
        if (!track) continue;
        const init = { direction: 'sendonly' };
        if (this.localTracks.stream) init.streams = [this.localTracks.stream];
        if (kind === 'video') {
          // Simulcast; layers the server has already said nobody needs start paused.
          init.sendEncodings = SIMULCAST_ENCODINGS.map((encoding) => ({
            ...encoding, active: this._layersWanted ? this._layersWanted.has(encoding.rid) : true,
          }));
        }
        pc.addTransceiver(track, init);
        if (kind === 'video') await this._applySenderParameters(); // before the offer
        changed = true;
        continue;
      }
      if (transceiver.sender.track !== track) await transceiver.sender.replaceTrack(track);
      const wanted = track ? 'sendonly' : 'inactive';
      if (transceiver.direction !== wanted) {
        transceiver.direction = wanted;
        changed = true;
      }
    }
    return changed;
  }

  /** The RTCRtpSender of the camera on the publish connection (null when there is none). */
  _videoSender() {
    const pc = this.publishPc;
    if (!pc || this.closed) return null;
    const transceiver = pc.getTransceivers().find((t) => t.receiver.track.kind === 'video'
      && t.currentDirection !== 'stopped' && t.direction !== 'stopped');
    return transceiver ? transceiver.sender : null;
  }

  /**
   * Brings the camera sender's parameters in line: the simulcast degradation preference, and the encodings
   * on and off as _layersWanted says. One getParameters/setParameters round at a time.
   */
  async _applySenderParameters() {
    if (this._layersBusy) return; // the running round picks up the newest wish when it is done
    this._layersBusy = true;
    try {
      // Each round applies the newest wish; a wish that came during the await makes another round.
      for (let round = 0; round < 10 && !this.closed; round += 1) {
        const sender = this._videoSender();
        if (!sender) return;
        const wanted = this._layersWanted;
        // getParameters and setParameters with no await between them (their transaction id must match).
        const parameters = sender.getParameters();
        const encodings = parameters.encodings || [];
        let changed = false;
        if (encodings.length > 1 && !this._degraded.has(sender)) {
          // Once per sender: a browser without the setting ignores it.
          this._degraded.add(sender);
          parameters.degradationPreference = SIMULCAST_DEGRADATION;
          changed = true;
        }
        for (const encoding of wanted ? encodings : []) {
          if (!encoding.rid) continue; // a single encoding (no simulcast): nothing to pause
          const active = wanted.has(encoding.rid);
          if (encoding.active !== active) {
            encoding.active = active;
            changed = true;
          }
        }
        if (!changed) return;
        await sender.setParameters(parameters);
      }
    } catch (err) {
      // Not fatal: the layers stay as they were; the next publisher_layers tries again.
      console.warn('huddle: could not change the simulcast layers', err);
    } finally {
      this._layersBusy = false;
    }
  }

  /** One publish offer at a time: a wish for another one while an offer is out waits for its answer. */
  _negotiatePublish(iceRestart) {
    this._enqueuePublish(async () => {
      if (this._offerOut) {
        this._wanted = { iceRestart: Boolean(iceRestart || this._wanted?.iceRestart) };
        return;
      }
      const pc = this.publishPc;
      if (pc.getTransceivers().length === 0) return; // nothing to publish (no devices, or no permission)
      if (pc.signalingState === 'have-local-offer') await pc.setLocalDescription({ type: 'rollback' });
      const offer = await pc.createOffer(iceRestart ? { iceRestart: true } : undefined);
      await pc.setLocalDescription(offer);
      this._offerOut = true;
      this._offers += 1;
      // The id comes back on an `error` (bad_sdp) only; the answer itself carries none.
      this.send({ type: 'sfu_offer', id: `publish-${this._offers}`, pc: 'publish', sdp: pc.localDescription.sdp });
      // Not sent (no socket): restartIce() offers again once signaling is back.
    });
  }

  _applyPublishAnswer(sdp) {
    this._enqueuePublish(async () => {
      const pc = this.publishPc;
      if (pc.signalingState !== 'have-local-offer') return; // stale or duplicate answer
      this._offerOut = false;
      await pc.setRemoteDescription({ type: 'answer', sdp });
      this._followUp();
    });
  }

  _followUp() {
    const wanted = this._wanted;
    this._wanted = null;
    if (wanted) this._negotiatePublish(wanted.iceRestart);
  }

  _onError(message) {
    if (typeof message.id !== 'string' || !message.id.startsWith('publish-')) return;
    // The server refused our publish offer: back to the last agreed state; a later change offers again.
    this._enqueuePublish(async () => {
      if (!this._offerOut) return;
      this._offerOut = false;
      if (this.publishPc.signalingState === 'have-local-offer') {
        await this.publishPc.setLocalDescription({ type: 'rollback' });
      }
      this._followUp();
    });
  }

  _onPublishState() {
    const pc = this.publishPc;
    const { connectionState, iceConnectionState } = pc;
    this.events.peerState(SFU_PUBLISH_ID, { connectionState, iceConnectionState, state: connectionState });
    if (connectionState === 'failed' && this._iceRestarts < MAX_ICE_RESTARTS) {
      this._iceRestarts += 1;
      this._negotiatePublish(true);
    } else if (connectionState === 'connected') {
      this._iceRestarts = 0;
    }
  }

  // --- subscribe ---

  _applySubscribeOffer(message) {
    this._subscribeQueue = this._subscribeQueue.then(async () => {
      if (this.closed) return;
      const pc = this.subscribePc;
      try {
        if (pc.signalingState !== 'stable') await pc.setLocalDescription({ type: 'rollback' });
        await pc.setRemoteDescription({ type: 'offer', sdp: message.sdp });
        const answer = await pc.createAnswer();
        await pc.setLocalDescription(answer);
        const reply = { type: 'sfu_answer', pc: 'subscribe', sdp: pc.localDescription.sdp };
        if (message.revision !== undefined) {
          reply.revision = message.revision;
          reply.id = `subscribe-${message.revision}`;
        }
        this.revision = message.revision ?? this.revision;
        this.send(reply);
      } catch (err) {
        if (!this.closed) {
          this.events.error(new HuddleError('peer_error',
            `could not apply the server's offer (revision ${message.revision}): ${err.message}`, { cause: err }));
        }
      }
      if (!this.closed) this._dropRetiredTracks();
    });
  }

  _onTrack(event) {
    const { track } = event;
    const msid = event.streams && event.streams[0];
    if (!msid) {
      console.debug('huddle: SFU track without a stream id ignored', track.id);
      return;
    }
    if (!this._watched.has(track)) {
      this._watched.add(track);
      track.addEventListener('ended', () => this._drop(track));
    }
    if (!this._watched.has(msid)) {
      this._watched.add(msid);
      msid.addEventListener('removetrack', (e) => {
        if (this._owners.get(e.track) === msid.id) this._drop(e.track);
      });
    }
    this._attach(msid.id, track);
  }

  _attach(participantId, track) {
    const previous = this._owners.get(track);
    if (previous !== undefined && previous !== participantId) this._drop(track); // m-section reused
    let stream = this.streams.get(participantId);
    if (!stream) {
      stream = new MediaStream();
      this.streams.set(participantId, stream);
    }
    for (const old of stream.getTracks()) {
      if (old !== track && old.kind === track.kind) {
        stream.removeTrack(old);
        this._owners.delete(old);
      }
    }
    if (!stream.getTracks().includes(track)) stream.addTrack(track);
    this._owners.set(track, participantId);
    this.events.track(participantId, stream, track);
    this.events.peerState(participantId, this.subscribeState());
  }

  _drop(track) {
    const participantId = this._owners.get(track);
    if (participantId === undefined) return;
    this._owners.delete(track);
    const stream = this.streams.get(participantId);
    if (!stream || !stream.getTracks().includes(track)) return;
    stream.removeTrack(track);
    this.events.trackRemoved(participantId, stream, track);
  }

  /** After an offer: tracks whose m-section no longer receives (inactive, or port 0) are gone. */
  _dropRetiredTracks() {
    for (const transceiver of this.subscribePc.getTransceivers()) {
      const track = transceiver.receiver.track;
      if (!this._owners.has(track)) continue;
      const receiving = transceiver.currentDirection === 'recvonly' || transceiver.currentDirection === 'sendrecv';
      if (!receiving) this._drop(track);
    }
  }

  _announce(participantId) {
    const stream = this.streams.get(participantId);
    if (!stream) return;
    for (const track of stream.getTracks()) this.events.track(participantId, stream, track);
    this.events.peerState(participantId, this.subscribeState());
  }

  _onSubscribeState() {
    const states = this.subscribeState();
    this.events.peerState(SFU_SUBSCRIBE_ID, states);
    for (const participantId of this.streams.keys()) this.events.peerState(participantId, states);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Local media

const MEDIA_ERROR_WORDS = {
  NotAllowedError: 'access to the camera and microphone was blocked',
  SecurityError: 'access to the camera and microphone was blocked',
  NotFoundError: 'no camera or microphone was found',
  NotReadableError: 'the camera or microphone is in use by another application',
  OverconstrainedError: 'the camera cannot provide the requested video',
  AbortError: 'the camera or microphone could not be started',
  TypeError: 'this browser cannot capture media here (a secure https page is needed)',
};

/**
 * Asks for camera and microphone; when that fails, for the microphone alone, then the camera alone. Resolves
 * with {stream, error}: stream is null when nothing could be captured; error describes what is missing.
 */
async function captureLocalMedia(constraints) {
  if (!navigator.mediaDevices?.getUserMedia) {
    return { stream: null, error: { name: 'TypeError', words: MEDIA_ERROR_WORDS.TypeError } };
  }
  let firstError;
  try {
    return { stream: await navigator.mediaDevices.getUserMedia(constraints), error: null };
  } catch (err) {
    firstError = err;
  }
  const fatal = ['NotAllowedError', 'SecurityError', 'TypeError'].includes(firstError.name);
  if (!fatal && constraints.audio && constraints.video) {
    for (const partial of [{ audio: constraints.audio }, { video: constraints.video }]) {
      try {
        const stream = await navigator.mediaDevices.getUserMedia(partial);
        const missing = partial.audio ? 'camera' : 'microphone';
        return { stream, error: { name: firstError.name, words: `the ${missing} is not available`, partial: true } };
      } catch {
        // try the next one
      }
    }
  }
  const words = MEDIA_ERROR_WORDS[firstError.name] || `the camera and microphone could not be used (${firstError.message})`;
  return { stream: null, error: { name: firstError.name, words } };
}

// ---------------------------------------------------------------------------------------------------------
// The client

/** Errors after which resuming cannot work: the call is over for this client. */
const RESUME_FATAL = new Set(['resume_failed', 'unauthorized', 'token_expired', 'wrong_room', 'invalid_room',
  'invalid_name', 'room_full']);

/** Whether `ice_servers` names a TURN server (a `turn:` or `turns:` URL). */
export function hasTurnServer(iceServers) {
  return (iceServers || []).some((server) => {
    const urls = Array.isArray(server?.urls) ? server.urls : [server?.urls];
    return urls.some((url) => typeof url === 'string' && /^turns?:/i.test(url));
  });
}

/** A participant id from the server, or null (for null, missing or malformed ones). */
function cleanParticipantId(id) {
  return typeof id === 'string' && id ? id : null;
}

/** A running recording as the server describes it (docs/protocol.md, "Recording"), copied; else null. */
function cleanRecording(recording) {
  if (recording === null || typeof recording !== 'object' || typeof recording.id !== 'string') return null;
  return recording.state === 'recording' ? { ...recording } : null;
}

/** Whether two `video_sizes` maps say the same. */
function sameSizes(a, b) {
  if (!a || !b) return false;
  const keys = Object.keys(a);
  if (keys.length !== Object.keys(b).length) return false;
  return keys.every((id) => b[id] && a[id][0] === b[id][0] && a[id][1] === b[id][1]);
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new HuddleError('timeout', `${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * A participant in a Huddle call.
 *
 * Events (CustomEvent, data in `detail`):
 *   state               {state, previous}  state: idle | connecting | connected | reconnecting | disconnected |
 *                                          error. `reconnecting`: the signaling socket dropped; media and
 *                                          participants are kept while a new socket resumes the call.
 *   joined              {self, room, participants, mode, iceServers, permissions, recording}
 *   resumed             {self, room, participants, mode, iceServers, permissions, recording, restored,
 *                                          moved}  back after `reconnecting`. restored: the server had lost
 *                                          the call (it restarted, or another node took it over) and rebuilt
 *                                          our seat; the SFU connections started afresh. moved: a different
 *                                          node serves the call now
 *   mode                {mode, previous}   the call moved to the SFU (previous 'p2p'), or back to p2p after a
 *                                          restored resume (a node that rebuilt the call without the SFU)
 *   participant-joined  {participant}
 *   participant-left    {participantId, participant, reason}
 *   participant-updated {participant, isSelf}  participant.connection: 'connected' | 'reconnecting'. After a
 *                                          restored resume, people not back yet stay 'reconnecting' until
 *                                          they are (or the grace period ends: participant-left, 'timeout')
 *   track               {participantId, stream, track}  stream: everything of that participant's to show
 *   track-removed       {participantId, stream, track}  the track left `stream` (SFU mode)
 *   peer-state          {participantId, connectionState, iceConnectionState, state}  in SFU mode also for
 *                                          'sfu:publish' and 'sfu:subscribe'; a participant's is the state of
 *                                          the connection their media arrives on
 *   local-stream        {stream}           the local camera/microphone stream (null once released)
 *   local-media         {audio, video}     what this client sends, after setAudioEnabled / setVideoEnabled
 *   active-speaker      {id, previous}     who speaks now (`activeSpeaker`; a participant id, possibly our
 *                                          own, or null), from the server's `active_speaker` and `joined`
 *   publisher-layers    {active}           SFU mode: the camera's simulcast layers some viewer needs (rids)
 *   recording           {recording, previous, reason}  the call's recording started or stopped. `recording`:
 *                                          the running one (also `this.recording`) or null; `previous`: the
 *                                          one running before (after a stop, as the server last described
 *                                          it: state 'processing', `stopped_at` set). reason: 'started' |
 *                                          'stopped' (someone started or stopped it), 'joined' (`joined` said
 *                                          otherwise, e.g. it changed while we were reconnecting), 'left' (our
 *                                          call ended)
 *   error               {code, message, source: 'server' | 'local', fatal, requestId, request}  `request`:
 *                                          'start_recording' | 'stop_recording' when the error answers
 *                                          startRecording() / stopRecording() (which also reject)
 *
 * Always relay (`relayOnly`, an option and a property): every peer connection uses only the TURN relays of
 * `ice_servers` (iceTransportPolicy 'relay'), so that no other participant learns this browser's addresses.
 * Read whenever a connection is created (joining, the move to the SFU, a new participant); connections that
 * exist already keep the policy they were made with. A server that names no TURN server cannot relay: the
 * client says so (error `relay_unavailable`, not fatal) and still gathers no other candidates.
 *
 * Adaptive stream (SFU mode): the page tells the client how large each remote video is shown
 * (setVideoSizes); the client sends `video_sizes` when that changes, at most every 250 ms, and once whenever
 * the SFU transport starts or the call resumes. `lastVideoSizes` is the last `sizes` sent.
 */
export class HuddleClient extends EventTarget {
  constructor({
    url, mediaConstraints = MEDIA_CONSTRAINTS, pingInterval, silenceTimeout,
    reconnectDelays = RECONNECT_DELAYS_MS, relayOnly = false,
  } = {}) {
    super();
    this.url = url || null;
    this.relayOnly = Boolean(relayOnly);
    this.mediaConstraints = mediaConstraints;
    this._signalingOptions = { pingInterval, silenceTimeout };
    this._reconnectDelays = reconnectDelays.length ? [...reconnectDelays] : [...RECONNECT_DELAYS_MS];
    this.state = 'idle';
    this.self = null;
    this.room = null;
    this.mode = null; // 'p2p' | 'sfu' once joined
    this.iceServers = [];
    this.permissions = null;
    this.participants = new Map();
    this.localStream = null;
    this.mediaError = null;
    this.resumeToken = null;
    this.reconnectGrace = null; // seconds
    this._wantAudio = true;
    this._wantVideo = true;
    this._joinName = null;
    this._signaling = null;
    this._transport = null;
    this._retiring = null; // the MeshTransport the call is moving away from (p2p -> sfu)
    this._migrations = new Map(); // participant id -> {participantId, expectVideo, since, trackSince}
    this._migrationTimer = null;
    this._checkingMigrations = false;
    this._resuming = null; // the SignalingChannel of a resume attempt
    this._reconnect = null; // {deadline, doors, next, tries, rounds, immediate, timer}
    this._doors = []; // WebSocket URLs to resume on (`doors` from `joined`), the node we are on first
    this._node = null; // the node serving our call, as it names itself (the first of `doors`)
    this._absent = new Map(); // participant id -> timer: known, not back yet after a restored resume
    this._session = 0;
    this.activeSpeaker = null; // participant id (maybe our own) or null
    this.recording = null; // the call's running recording ({id, outputs, started_at, started_by, ...}) or null
    this._recordingRequests = new Map(); // request id -> {request, resolve, reject}, oldest first
    this._recordingRequestsSent = 0;
    // Adaptive stream: what the page shows (setVideoSizes), what went out last, and the throttle.
    this.lastVideoSizes = null; // {participantId: [w, h]} of the last `video_sizes` sent
    this.videoSizesSent = 0;
    this._videoSizes = {};
    this._videoSizesDue = false; // send once even if nothing changed (the SFU transport started, or resumed)
    this._videoSizesAt = -Infinity;
    this._videoSizesTimer = null;
  }

  get audioEnabled() {
    return Boolean(this._localTrack('audio')) && this._wantAudio;
  }

  get videoEnabled() {
    return Boolean(this._localTrack('video')) && this._wantVideo;
  }

  /** What the user asked for (setAudioEnabled / setVideoEnabled), applied whenever media is captured. */
  get mediaPreferences() {
    return { audio: this._wantAudio, video: this._wantVideo };
  }

  get hasAudio() {
    return Boolean(this._localTrack('audio'));
  }

  get hasVideo() {
    return Boolean(this._localTrack('video'));
  }

  /**
   * Joins `room` as `name` (open rooms) or with `token` (servers with a secret). Resolves with the `joined`
   * details; rejects with a HuddleError (also reported as an `error` event).
   */
  async join({ room, name, token } = {}) {
    if (this.state === 'connecting' || this.state === 'connected' || this.state === 'reconnecting') {
      throw this._fail(new HuddleError('already_joined', 'already in a call; leave it first'), false);
    }
    this._teardown();
    if (typeof room !== 'string' || !ROOM_PATTERN.test(room)) {
      this._setState('error');
      throw this._fail(new HuddleError('invalid_room', "room name must be 1-64 letters, digits, '-' or '_'"));
    }
    const displayName = name === undefined || name === null || name === '' ? null : cleanDisplayName(name);
    if ((name && displayName === null) || (!displayName && !token)) {
      this._setState('error');
      throw this._fail(new HuddleError('invalid_name', 'a display name of 1-64 characters is needed'));
    }

    const session = ++this._session;
    this.room = room;
    this._joinName = displayName;
    this._setState('connecting');
    const signaling = this._newChannel();
    this._signaling = signaling;

    // Camera permission and the socket come up in parallel; `join` goes out once both are settled, so that
    // every peer connection is created with the local tracks in place.
    const media = this._ensureLocalMedia(session);
    try {
      await signaling.open();
      await media;
      if (session !== this._session) throw new HuddleError('aborted', 'left before the call was joined');
      const request = { type: 'join', v: PROTOCOL_VERSION, room };
      if (displayName) request.name = displayName;
      if (token) request.token = token;
      await this._joinFollowingRedirects(signaling, request, (next) => {
        if (session !== this._session) return false;
        this._signaling = next;
        return true;
      });
    } catch (err) {
      const error = err instanceof HuddleError ? err
        : new HuddleError('connection_failed', String(err?.message || err), { cause: err });
      if (session === this._session) {
        if (error.source !== 'server') this._fail(error);
        this._teardown();
        this._releaseLocalMedia();
        this._setState('error');
      }
      throw error;
    }
    return this._joinedDetail();
  }

  /**
   * Leaves the call, closes every connection and releases camera and microphone. Synchronous up to sending
   * `leave`, so that it works from `pagehide`.
   */
  leave() {
    this._session += 1;
    const signaling = this._signaling;
    let told = false;
    if (signaling) {
      // The server answers `leave` by closing the socket; close it ourselves if it does not.
      this._signaling = null;
      told = signaling.send({ type: 'leave' });
      if (told) setTimeout(() => signaling.close(1000, 'left'), 2000);
      else signaling.close(1000, 'left');
    }
    if (!told && this.resumeToken && this.room && navigator.sendBeacon) {
      // No socket to say it on (we are reconnecting): a beacon still gets out of a closing tab, so the others
      // do not wait out the grace period for us.
      navigator.sendBeacon(`/api/rooms/${encodeURIComponent(this.room)}/leave`, this.resumeToken);
    }
    const resuming = this._resuming;
    if (resuming) {
      // A resume attempt in flight: were its `join` to be taken, `leave` (after it on the same socket) ends it.
      this._resuming = null;
      if (resuming.send({ type: 'leave' })) setTimeout(() => resuming.close(1000, 'left'), 2000);
      else resuming.close(1000, 'left');
    }
    this._teardown('self_left');
    this._releaseLocalMedia();
    this._setState('idle');
  }

  /** Microphone on or off (track.enabled, no renegotiation); tells the others. Returns the new state. */
  setAudioEnabled(enabled) {
    this._wantAudio = Boolean(enabled);
    return this._applyLocalMedia().audio;
  }

  /** Camera on or off (track.enabled, no renegotiation); tells the others. Returns the new state. */
  setVideoEnabled(enabled) {
    this._wantVideo = Boolean(enabled);
    return this._applyLocalMedia().video;
  }

  /**
   * Adaptive stream: `sizes` maps remote participant ids to the size in device pixels their video is shown at,
   * [width, height]; [0, 0] (or leaving someone out) means not shown. Call it whenever a size may have
   * changed: in SFU mode a `video_sizes` goes out when they differ from the last one sent, at most every
   * 250 ms (the newest sizes win). In P2P mode nothing is sent; the sizes are kept for when the call moves to
   * the SFU.
   */
  setVideoSizes(sizes) {
    const clean = {};
    for (const [id, size] of Object.entries(sizes || {})) {
      if (!Array.isArray(size) || size.length !== 2) continue;
      const [w, h] = size.map((n) => (Number.isFinite(n) && n > 0 ? Math.round(n) : 0));
      clean[id] = w > 0 && h > 0 ? [w, h] : [0, 0];
    }
    this._videoSizes = clean;
    this._sendVideoSizes();
  }

  /**
   * Starts recording the call (the token needs `permissions.record`). `outputs`: some of 'composite' (the
   * speaker-view MP4) and 'tracks' (a file per track); both when left out. Resolves with the recording once
   * the server says it runs (the `recording` event comes at the same time); rejects with a HuddleError, also
   * reported as an `error` event with `request: 'start_recording'` (codes: forbidden, already_recording,
   * bad_request, unavailable, not_found, connection_lost). A p2p call moves to the SFU first (`mode`).
   */
  startRecording(outputs) {
    const message = { type: 'start_recording' };
    if (outputs !== undefined && outputs !== null) message.outputs = [...outputs];
    return this._recordingRequest(message);
  }

  /**
   * Stops the call's recording. Resolves with it as the server describes it once stopped (state
   * 'processing': its files are being finished and stored); rejects like startRecording (request
   * 'stop_recording'; codes: forbidden, not_recording, connection_lost).
   */
  stopRecording() {
    return this._recordingRequest({ type: 'stop_recording' });
  }

  /** The camera's simulcast layers the server wants on (SFU mode; null until it said, meaning all). */
  get publisherLayers() {
    return this._transport instanceof SfuTransport ? this._transport.publisherLayers : null;
  }

  /**
   * [{participantId, pc}] for every current peer connection. P2P: one per remote participant. SFU:
   * {participantId: 'sfu:publish'} and {participantId: 'sfu:subscribe'}, followed, while a call moves from p2p
   * to the SFU, by the P2P connections not closed yet.
   */
  peerConnections() {
    const current = this._transport ? this._transport.connections() : [];
    const retiring = this._retiring ? this._retiring.connections() : [];
    return [...current, ...retiring];
  }

  // --- messages from the server ---

  _newChannel(url = this.url || defaultSignalingUrl()) {
    const channel = new SignalingChannel(url, this._signalingOptions);
    // Events of a channel this client has let go of (left, torn down, replaced) are ignored.
    channel.addEventListener('message', (event) => {
      if (this._signaling === channel) {
        this._onMessage(event.detail);
      } else if (this._resuming === channel && event.detail.type === 'joined') {
        // The resume attempt succeeded: this socket carries the call from now on (before any message after
        // `joined` on it is handled).
        this._resuming = null;
        this._signaling = channel;
        this._onResumed(event.detail);
      }
    });
    channel.addEventListener('close', (event) => {
      if (this._signaling === channel) this._onSignalingClosed(event.detail);
    });
    return channel;
  }

  /**
   * Sends `join` on the open `channel`, following `redirect` answers (the call is on another node): each time
   * the same `join` goes out on a new socket to the given URL, at most MAX_REDIRECTS times. `adopt(next)`
   * makes the new socket the one in use before the old one closes, or returns false when the join was
   * abandoned meanwhile. `limit(promise, what)` bounds each step. Resolves with the socket that answered
   * (its `joined` was handled as it came); rejects with a HuddleError.
   */
  async _joinFollowingRedirects(channel, request, adopt, limit = (promise) => promise) {
    let current = channel;
    for (let redirects = 0; ; redirects += 1) {
      const reply = await limit(current.request(request), 'joining');
      if (reply.type !== 'redirect') return current;
      if (redirects >= MAX_REDIRECTS) {
        throw new HuddleError('too_many_redirects',
          `the server sent this call on to another node more than ${MAX_REDIRECTS} times`);
      }
      const url = cleanSignalingUrl(reply.url);
      if (!url) {
        throw new HuddleError('bad_redirect', 'the server sent this call to an address that is no WebSocket');
      }
      // A call's home sends joiners on to the node its call spills over to, with a ticket for that node.
      request = { ...request };
      delete request.ticket;
      if (typeof reply.ticket === 'string') request.ticket = reply.ticket;
      const next = this._newChannel(url);
      if (!adopt(next)) {
        next.close(1000, 'not joining');
        throw new HuddleError('aborted', 'left before the call was joined');
      }
      current.close(1000, 'redirected');
      current = next;
      await limit(current.open(), 'opening the socket');
    }
  }

  _onMessage(message) {
    switch (message.type) {
      case 'joined':
        this._onJoined(message);
        break;
      case 'participant_joined':
        this._onParticipantJoined(message.participant);
        break;
      case 'participant_updated':
        this._onParticipantUpdated(message.participant);
        break;
      case 'participant_left':
        this._onParticipantLeft(message.id, message.reason);
        break;
      case 'offer':
      case 'answer':
      case 'candidate':
        if (this._transport instanceof MeshTransport && this.participants.has(message.from)) {
          this._transport.handleSignal(message);
        }
        break;
      case 'mode':
        if (message.mode === 'sfu') this._switchToSfu();
        break;
      case 'sfu_offer':
      case 'sfu_answer':
        // An SFU offer means the call is in the SFU, whether or not `mode` came first.
        if (message.type === 'sfu_offer' && message.pc === 'subscribe') this._switchToSfu();
        if (this._transport instanceof SfuTransport) this._transport.handleSignal(message);
        break;
      case 'publisher_layers':
        if (this._transport instanceof SfuTransport && Array.isArray(message.active)) {
          this._transport.setPublisherLayers(message.active);
          emit(this, 'publisher-layers', { active: [...message.active] });
        }
        break;
      case 'active_speaker':
        this._setActiveSpeaker(message.id);
        break;
      case 'recording':
        this._onRecording(message.recording);
        break;
      case 'resume_token':
        // What the call's state is now (a recording started or stopped), for whichever node resumes us.
        if (typeof message.token === 'string') this.resumeToken = message.token;
        break;
      case 'error':
        if (typeof message.id === 'string' && message.id.startsWith(VIDEO_SIZES_ID_PREFIX)) {
          // A server that does not know `video_sizes` yet (unknown_type): it sends every video anyway.
          console.debug('huddle: video_sizes refused:', message.code, message.message);
          break;
        }
        if (this._transport instanceof SfuTransport && typeof message.id === 'string') {
          this._transport.handleSignal(message);
        }
        this._settleRecordingRequest(message.id, null, new HuddleError(message.code,
          message.message || message.code, { source: 'server', requestId: message.id }));
        this._onServerError(message);
        break;
      default:
        break; // pong, and types from newer servers
    }
  }

  _onJoined(message) {
    this.self = { ...message.self };
    this.room = message.room || this.room;
    this.mode = message.mode === 'sfu' ? 'sfu' : 'p2p';
    this.iceServers = message.ice_servers || [];
    // The server always says; a reply without it grants only what joining itself gives.
    this.permissions = message.permissions || { publish: true, subscribe: true, record: false, download: false };
    this.resumeToken = typeof message.resume_token === 'string' ? message.resume_token : null;
    this.reconnectGrace = Number(message.reconnect_grace) > 0 ? Number(message.reconnect_grace)
      : DEFAULT_RECONNECT_GRACE_S;
    this.participants = new Map();
    for (const participant of message.participants || []) this.participants.set(participant.id, { ...participant });
    this._clearAbsent();
    this._setDoors(message);
    this._checkRelay();

    if (message.mode !== 'p2p' && message.mode !== 'sfu') {
      this._fail(new HuddleError('unsupported_mode', `this client cannot take part in a "${message.mode}" call`));
    }
    this._transport = this._createTransport(this.mode);
    this._transport.start();
    for (const id of this.participants.keys()) this._transport.connectTo(id);

    this.lastVideoSizes = null;
    this._videoSizesDue = this.mode === 'sfu';
    // Known before `joined`, so that the page's first layout (and first video_sizes) has the speaker large.
    const previousSpeaker = this.activeSpeaker;
    this.activeSpeaker = cleanParticipantId(message.active_speaker);
    const previousRecording = this.recording;
    this.recording = cleanRecording(message.recording);
    this._setState('connected');
    emit(this, 'joined', this._joinedDetail());
    this._applyLocalMedia(true);
    if (this.activeSpeaker !== previousSpeaker) {
      emit(this, 'active-speaker', { id: this.activeSpeaker, previous: previousSpeaker });
    }
    if (this.recording?.id !== previousRecording?.id) {
      emit(this, 'recording', { recording: this.recording, previous: previousRecording, reason: 'joined' });
    }
    this._sendVideoSizes(); // once right after the SFU transport started (the page had its say in `joined`)
  }

  _onParticipantJoined(participant) {
    if (!participant || typeof participant.id !== 'string' || participant.id === this.self?.id) return;
    if (this.participants.has(participant.id)) {
      // Someone kept through a restored resume, back in the rebuilt call: the same tile and, in p2p mode, the
      // same peer connection (ICE restarts as after any resume).
      this._onParticipantUpdated({ connection: 'connected', ...participant });
      return;
    }
    this.participants.set(participant.id, { ...participant });
    emit(this, 'participant-joined', { participant: this.participants.get(participant.id) });
    // After the event, so that tracks the SFU delivered before we heard of them find a tile.
    this._transport?.expect(participant.id);
  }

  _onParticipantUpdated(participant, { restartIce = true } = {}) {
    if (!participant || typeof participant.id !== 'string') return;
    if (this.self && participant.id === this.self.id) {
      Object.assign(this.self, participant);
      emit(this, 'participant-updated', { participant: this.self, isSelf: true });
      return;
    }
    const known = this.participants.get(participant.id);
    if (!known) return;
    this._clearAbsent(participant.id); // the server knows about them again: its grace period applies
    const wasReconnecting = known.connection === 'reconnecting';
    Object.assign(known, participant);
    emit(this, 'participant-updated', { participant: known, isSelf: false });
    if (restartIce && wasReconnecting && known.connection === 'connected'
      && this._transport instanceof MeshTransport) {
      // They resumed: in p2p mode the later joiner of the two restarts ICE (a no-op when that is them).
      this._transport.restartIce(participant.id);
    }
  }

  _onParticipantLeft(participantId, reason) {
    this._clearAbsent(participantId);
    const participant = this.participants.get(participantId);
    this._transport?.remove(participantId);
    this._retiring?.remove(participantId);
    this._migrations.delete(participantId);
    if (!participant) return;
    this.participants.delete(participantId);
    emit(this, 'participant-left', { participantId, participant, reason: reason || 'left' });
    // Whoever left speaks no more (the server's next `active_speaker` says who does).
    if (this.activeSpeaker === participantId) this._setActiveSpeaker(null);
  }

  /**
   * After a restored resume: someone the rebuilt call has not seen again yet keeps their tile, marked
   * 'reconnecting', until they are back or the grace period is over (then they are gone, as if the server
   * had timed them out).
   */
  _markAbsent(participantId) {
    const known = this.participants.get(participantId);
    if (!known) return;
    clearTimeout(this._absent.get(participantId));
    const graceMs = (this.reconnectGrace || DEFAULT_RECONNECT_GRACE_S) * 1000;
    this._absent.set(participantId, setTimeout(() => {
      this._absent.delete(participantId);
      this._onParticipantLeft(participantId, 'timeout');
    }, graceMs));
    if (known.connection === 'reconnecting') return;
    known.connection = 'reconnecting';
    emit(this, 'participant-updated', { participant: known, isSelf: false });
  }

  /** Stops waiting for `participantId` (every participant when left out). */
  _clearAbsent(participantId) {
    const ids = participantId === undefined ? [...this._absent.keys()] : [participantId];
    for (const id of ids) {
      clearTimeout(this._absent.get(id));
      this._absent.delete(id);
    }
  }

  /**
   * Where to resume (`doors` from `joined`): the URL this socket reached the node at first, then the other
   * nodes. The first door is the node's own name for itself, kept to tell whether a later resume landed on
   * another node; the URL that worked stands in for it, as a proxy in front may be the only way there.
   */
  _setDoors(message) {
    const named = Array.isArray(message.doors) ? message.doors.map(cleanSignalingUrl).filter(Boolean) : [];
    this._node = named[0] || null;
    this._doors = [...new Set([this._signaling?.url, ...named.slice(1)].filter(Boolean))];
  }

  _setActiveSpeaker(id) {
    const speaker = cleanParticipantId(id);
    if (speaker === this.activeSpeaker) return;
    const previous = this.activeSpeaker;
    this.activeSpeaker = speaker;
    emit(this, 'active-speaker', { id: speaker, previous });
  }

  // --- adaptive stream (docs/protocol.md, "video_sizes") ---

  /**
   * Sends the page's video sizes when they differ from the last ones sent (or a send is due), in SFU mode
   * only, at most once per VIDEO_SIZES_INTERVAL_MS: a change within that time goes out when it is over.
   */
  _sendVideoSizes() {
    if (this.mode !== 'sfu' || !(this._transport instanceof SfuTransport) || this.state !== 'connected'
      || !this._signaling) {
      return; // kept: the next start of the SFU transport, or the resume, sends them
    }
    const sizes = {};
    // Only people in the call: a tile the page has not removed yet must not name someone who left.
    for (const [id, size] of Object.entries(this._videoSizes)) if (this.participants.has(id)) sizes[id] = size;
    if (!this._videoSizesDue && sameSizes(sizes, this.lastVideoSizes)) return;
    const wait = this._videoSizesAt + VIDEO_SIZES_INTERVAL_MS - performance.now();
    if (wait > 0) {
      if (!this._videoSizesTimer) {
        this._videoSizesTimer = setTimeout(() => {
          this._videoSizesTimer = null;
          this._sendVideoSizes();
        }, wait);
      }
      return;
    }
    // The id only comes back on an `error` (e.g. unknown_type from an older server), which is then ignored.
    const id = `${VIDEO_SIZES_ID_PREFIX}${this.videoSizesSent + 1}`;
    if (!this._signaling.send({ type: 'video_sizes', id, sizes })) return;
    this.videoSizesSent += 1;
    this._videoSizesAt = performance.now();
    this._videoSizesDue = false;
    this.lastVideoSizes = sizes;
  }

  _stopVideoSizes() {
    clearTimeout(this._videoSizesTimer);
    this._videoSizesTimer = null;
    this._videoSizesDue = false;
  }

  // --- recording (docs/protocol.md, "Recording") ---

  /**
   * Sends a start_recording / stop_recording. The server answers a success with the `recording` message it
   * sends everyone, which carries no request id, and a refusal with an `error` that does; so these are
   * matched here (_onRecording, _settleRecordingRequest), not by SignalingChannel.request.
   */
  _recordingRequest(message) {
    return new Promise((resolve, reject) => {
      this._recordingRequestsSent += 1;
      const id = `${message.type}-${this._recordingRequestsSent}`;
      this._recordingRequests.set(id, { request: message.type, resolve, reject });
      const sent = this.state === 'connected' && this._signaling && this._signaling.send({ ...message, id });
      if (!sent) {
        const error = new HuddleError('connection_lost', 'not connected to the call', { requestId: id });
        this._settleRecordingRequest(id, null, error);
        this._fail(error, false, { requestId: id, request: message.type });
      }
    });
  }

  /** Resolves (`error` null) or rejects the recording request `id`, if it is still waiting. */
  _settleRecordingRequest(id, result, error) {
    const pending = this._recordingRequests.get(id);
    if (!pending) return;
    this._recordingRequests.delete(id);
    if (error) pending.reject(error);
    else pending.resolve(result);
  }

  /** The socket the requests went out on is gone: their answers are lost with it. */
  _rejectRecordingRequests(report) {
    for (const [id, { request }] of [...this._recordingRequests]) {
      const error = new HuddleError('connection_lost', `the connection was lost before ${request} was answered`);
      this._settleRecordingRequest(id, null, error);
      if (report) this._fail(error, false, { requestId: id, request });
    }
  }

  _onRecording(recording) {
    if (recording === null || typeof recording !== 'object' || typeof recording.id !== 'string') return;
    const running = recording.state === 'recording';
    // The server handles one socket's messages in order and answers each before reading the next, so a
    // `recording` answers our oldest request of its kind. A start is ours only if we started it (when someone
    // else's came first, ours gets already_recording after this). Any stop settles a stop of ours: one that
    // lost the race gets not_recording later, when nothing waits for it any more.
    const kind = running ? 'start_recording' : 'stop_recording';
    for (const [id, pending] of this._recordingRequests) {
      if (pending.request !== kind) continue;
      if (!running || recording.started_by === this.self?.id) this._settleRecordingRequest(id, { ...recording });
      break;
    }
    if (running) {
      this._setRecording({ ...recording }, 'started');
    } else if (this.recording && this.recording.id === recording.id) {
      this._setRecording(null, 'stopped', { ...recording });
    }
  }

  /** `recording`: the running one or null. `previous` defaults to the one that ran until now. */
  _setRecording(recording, reason, previous = this.recording) {
    if ((recording?.id ?? null) === (this.recording?.id ?? null)) {
      if (recording) this.recording = recording; // the same one, described again
      return;
    }
    this.recording = recording;
    emit(this, 'recording', { recording, previous, reason });
  }

  _onServerError(message) {
    const fatalCodes = ['unauthorized', 'token_expired', 'wrong_room', 'invalid_room', 'invalid_name',
      'room_full', 'already_joined', 'not_joined'];
    const fatal = this.state === 'connecting' && fatalCodes.includes(message.code);
    const detail = {
      code: message.code, message: message.message || message.code, source: 'server', fatal,
      requestId: message.id,
    };
    const recordingRequest = typeof message.id === 'string' && message.id.match(RECORDING_ID_PATTERN);
    if (recordingRequest) detail.request = recordingRequest[1];
    emit(this, 'error', detail);
  }

  _onSignalingClosed({ code, lost }) {
    const wasConnected = this.state === 'connected';
    const final = [CLOSE_UNAUTHORIZED, CLOSE_REPLACED, CLOSE_REMOVED].includes(code);
    if (wasConnected && this.resumeToken && !final) {
      // Keep the call (media, participants, tiles) and resume it on a new socket.
      this._signaling = null;
      this._rejectRecordingRequests(true);
      this._startReconnecting({ serviceRestart: code === CLOSE_SERVICE_RESTART });
      return;
    }
    this._teardown('connection_lost');
    if (!wasConnected) return; // while connecting, join() reports it through its rejection
    if (code === CLOSE_REPLACED) {
      this._fail(new HuddleError('replaced', 'you joined this call again from another tab or device'));
    } else if (code === CLOSE_REMOVED) {
      this._fail(new HuddleError('removed', 'the server ended your connection to the call'));
    } else {
      this._fail(new HuddleError('connection_lost', lost
        ? 'no word from the server for 12 seconds' : `the server closed the connection (${code})`));
    }
    this._setState('disconnected');
  }

  // --- reconnection (docs/protocol.md, "Reconnection") ---

  /**
   * Resumes the call on a new socket, trying the doors in turn: the one the call was on first, unless that
   * node said it stops serving (close code 1012), in which case another door goes first and at once.
   */
  _startReconnecting({ serviceRestart = false } = {}) {
    const graceMs = (this.reconnectGrace || DEFAULT_RECONNECT_GRACE_S) * 1000;
    const doors = this._doors.length ? [...this._doors] : [this.url || defaultSignalingUrl()];
    this._reconnect = {
      deadline: performance.now() + graceMs,
      doors,
      next: serviceRestart && doors.length > 1 ? 1 : 0, // index of the door the next attempt uses
      tries: 0,
      rounds: 0, // rounds begun after a wait (the backoff step)
      immediate: serviceRestart,
      quickRetries: 0, // doors asked again soon after they sent us on to a node we could not reach
      timer: null,
    };
    this._setState('reconnecting');
    this._scheduleResume(this._session);
  }

  /** `again`: ask this door again soon (it sent us on to a node we could not reach), outside the rounds. */
  _scheduleResume(session, again = null) {
    const reconnect = this._reconnect;
    if (!reconnect || session !== this._session) return;
    const { doors } = reconnect;
    let wait = 0; // the next door of a round is tried as soon as the one before failed
    if (again !== null) {
      wait = REDIRECT_RETRY_MS + Math.random() * REDIRECT_RETRY_JITTER_MS;
      reconnect.quickRetries += 1;
    } else if (reconnect.tries % doors.length === 0) {
      if (reconnect.immediate && reconnect.tries === 0) {
        wait = 0;
      } else {
        const delays = this._reconnectDelays;
        wait = delays[Math.min(reconnect.rounds, delays.length - 1)];
        reconnect.rounds += 1;
      }
    }
    // The last attempt comes just before the grace period is over, however the backoff falls.
    const left = reconnect.deadline - performance.now() - RESUME_LAST_MARGIN_MS;
    const delay = Math.min(wait, left);
    let door = again;
    if (door === null) {
      door = doors[reconnect.next % doors.length];
      reconnect.next += 1;
      reconnect.tries += 1;
    }
    if (delay < 0) {
      this._giveUp(new HuddleError('resume_failed',
        `could not reconnect to the call within ${this.reconnectGrace} seconds`));
      return;
    }
    reconnect.timer = setTimeout(() => this._attemptResume(session, door), delay);
  }

  async _attemptResume(session, door) {
    const reconnect = this._reconnect;
    if (!reconnect || session !== this._session || this.state !== 'reconnecting') return;
    reconnect.timer = null;
    let channel = this._newChannel(door);
    let redirected = false;
    this._resuming = channel;
    const budget = Math.max(500, Math.min(RESUME_ATTEMPT_MS, reconnect.deadline - performance.now()));
    const limit = (promise, what) => withTimeout(promise, budget, what);
    let failure = null;
    try {
      await limit(channel.open(), 'opening the socket');
      if (this._resuming !== channel) return;
      const request = { type: 'join', v: PROTOCOL_VERSION, room: this.room, resume: this.resumeToken };
      if (this._joinName) request.name = this._joinName;
      // A node that rebuilds the call from our token starts it where we were (no p2p -> sfu flap).
      if (this.mode === 'p2p' || this.mode === 'sfu') request.mode = this.mode;
      channel = await this._joinFollowingRedirects(channel, request, (next) => {
        if (this._resuming !== channel) return false;
        this._resuming = next;
        channel = next;
        redirected = true;
        return true;
      }, limit);
    } catch (err) {
      failure = err instanceof HuddleError ? err
        : new HuddleError('connection_failed', String(err?.message || err), { cause: err });
    }
    if (this._signaling === channel) return; // resumed (_onResumed took over)
    if (this._resuming === channel) this._resuming = null;
    channel.close(1000, 'resume attempt over');
    if (session !== this._session || this.state !== 'reconnecting') return;
    // Anything else (a socket that would not open or closed, try_again, a timeout) is worth another try.
    if (failure && failure.source === 'server' && RESUME_FATAL.has(failure.code)) {
      const error = failure.code === 'resume_failed'
        ? new HuddleError('resume_failed', 'you were away from the call too long to rejoin it as you were',
          { source: 'server' })
        : failure;
      this._giveUp(error);
      return;
    }
    const quick = failure && redirected && reconnect.quickRetries < REDIRECT_RETRIES_MAX;
    this._scheduleResume(session, quick ? door : null);
  }

  _stopReconnecting() {
    if (this._reconnect?.timer) clearTimeout(this._reconnect.timer);
    this._reconnect = null;
    if (this._resuming) {
      const channel = this._resuming;
      this._resuming = null;
      channel.close(1000, 'not resuming');
    }
  }

  /** The call could not be resumed: end it here (state `disconnected`; the page offers to rejoin). */
  _giveUp(error) {
    this._stopReconnecting();
    this._teardown('connection_lost');
    this._fail(error);
    this._setState('disconnected');
  }

  _onResumed(message) {
    this._stopReconnecting();
    if (message.resumed !== true || !this.self || message.self?.id !== this.self.id) {
      // A fresh seat rather than ours (the server no longer knew us): start over on this socket.
      this._closeTransports();
      for (const [participantId, participant] of [...this.participants]) {
        this.participants.delete(participantId);
        emit(this, 'participant-left', { participantId, participant, reason: 'rejoined' });
      }
      this._onJoined(message);
      return;
    }
    this.self = { ...message.self };
    this.iceServers = message.ice_servers || this.iceServers;
    this.permissions = message.permissions || this.permissions;
    if (typeof message.resume_token === 'string') this.resumeToken = message.resume_token;
    if (Number(message.reconnect_grace) > 0) this.reconnectGrace = Number(message.reconnect_grace);
    // Restored: the node had no state for us (it restarted, or took the call over) and rebuilt our seat from
    // the resume token. It knows only those who are back already.
    const restored = message.restored === true;
    const previousNode = this._node;
    this._setDoors(message);
    const moved = Boolean(previousNode && this._node && previousNode !== this._node);

    // What happened while we were away: who left, who came, who changed.
    const now = new Map((message.participants || []).map((p) => [p.id, p]));
    for (const id of [...this.participants.keys()]) {
      if (now.has(id)) continue;
      if (restored) this._markAbsent(id);
      else this._onParticipantLeft(id, 'left');
    }
    for (const [id, participant] of now) {
      // No ICE restart per participant here: the one restart below covers every connection.
      if (this.participants.has(id)) this._onParticipantUpdated(participant, { restartIce: false });
      else this._onParticipantJoined(participant);
    }

    const switching = message.mode === 'sfu' && !(this._transport instanceof SfuTransport);
    if (switching) {
      this._switchToSfu(); // new connections: nothing to restart
    } else if (restored && this._transport instanceof SfuTransport) {
      if (message.mode === 'p2p') this._restartAsMesh([...now.keys()]);
      else this._restartSfu();
    } else {
      // SFU: a publish offer with iceRestart (the server sends a new subscribe offer of its own).
      // P2P: every connection we initiated (we joined after them) offers with iceRestart.
      this._transport?.restartIce();
    }
    // The recording may have started or stopped while we were away (a server without recording says nothing).
    const previousRecording = this.recording;
    if ('recording' in message) this.recording = cleanRecording(message.recording);
    this._setState('connected');
    emit(this, 'resumed', { ...this._joinedDetail(), restored, moved });
    this._applyLocalMedia(true);
    if ('active_speaker' in message) this._setActiveSpeaker(message.active_speaker);
    if (this.recording?.id !== previousRecording?.id) {
      emit(this, 'recording', { recording: this.recording, previous: previousRecording, reason: 'joined' });
    }
    // The sizes may have changed while we were away: say them again (_switchToSfu has just done so).
    if (!switching) this._videoSizesDue = true;
    this._sendVideoSizes();
  }

  // --- transports ---

  _createTransport(mode) {
    let transport = null;
    const options = {
      iceServers: this.iceServers,
      iceTransportPolicy: this.relayOnly ? ICE_RELAY : ICE_ALL,
      localTracks: this._localTracks(),
      permissions: this.permissions,
      send: (msg) => (this._signaling ? this._signaling.send(msg) : false),
      events: this._transportEvents(() => transport),
    };
    transport = mode === 'sfu' ? new SfuTransport(options) : new MeshTransport(options);
    return transport;
  }

  _transportEvents(transportOf) {
    return {
      track: (participantId, stream, track) => {
        const transport = transportOf();
        if (transport === this._retiring) {
          // Late P2P media of someone still waiting for their SFU media.
          if (this._migrations.has(participantId)) emit(this, 'track', { participantId, stream, track });
        } else if (transport === this._transport && !this._migrations.has(participantId)) {
          emit(this, 'track', { participantId, stream, track });
        }
        // SFU media of someone still on P2P: shown once it flows (_checkMigrations).
      },
      trackRemoved: (participantId, stream, track) => {
        if (transportOf() === this._transport && !this._migrations.has(participantId)) {
          emit(this, 'track-removed', { participantId, stream, track });
        }
      },
      peerState: (participantId, states) => {
        // A retiring P2P connection's states say nothing about the call any more.
        if (transportOf() !== this._transport || this._migrations.has(participantId)) return;
        emit(this, 'peer-state', { participantId, ...states });
      },
      error: (error) => {
        if (transportOf() === this._transport) this._fail(error, false);
      },
    };
  }

  /**
   * p2p -> sfu (`mode`, or `joined` after a resume): the SFU transport starts at once; each P2P connection
   * that carries media stays until that participant's media flows through the SFU (or a time limit), so that
   * no tile goes blank.
   */
  _switchToSfu() {
    if (this._transport instanceof SfuTransport || !this.self) return;
    const previous = this.mode;
    const mesh = this._transport instanceof MeshTransport ? this._transport : null;
    this.mode = 'sfu';
    this._transport = this._createTransport('sfu');
    if (mesh) {
      mesh.retire(); // closes the connections that never carried media
      if (mesh.links.size > 0) {
        this._retiring = mesh;
        const since = performance.now();
        for (const participantId of mesh.links.keys()) {
          const tracks = mesh.remoteTracks(participantId);
          this._migrations.set(participantId, {
            participantId, since, trackSince: null, expectVideo: tracks.some((t) => t.kind === 'video'),
          });
        }
        this._migrationTimer = setInterval(() => this._checkMigrations(), MIGRATION_POLL_MS);
      } else {
        mesh.close();
      }
    }
    this._transport.start();
    for (const id of this.participants.keys()) this._transport.expect(id);
    this._videoSizesDue = true;
    emit(this, 'mode', { mode: 'sfu', previous });
    this._sendVideoSizes(); // once right after the SFU transport started (the page had its say in `mode`)
  }

  /**
   * The node lost our SFU state (a restored resume): close both SFU connections and start afresh, as on
   * entering sfu mode (a new publish offer; the server's subscribe offers follow). The tiles wait for the new
   * connection's media ("Connecting…").
   */
  _restartSfu() {
    this._transport.close();
    this._transport = this._createTransport('sfu');
    this._transport.start();
    const states = this._transport.subscribeState();
    for (const participantId of this.participants.keys()) {
      if (!this._migrations.has(participantId)) emit(this, 'peer-state', { participantId, ...states });
    }
    this._videoSizesDue = true;
  }

  /**
   * The node rebuilt the call peer to peer although we were on the SFU (it did not take our `mode`): connect
   * as a newcomer would, offering to those back already (those who come back later offer to us), until the
   * call moves to the SFU again.
   */
  _restartAsMesh(present) {
    this._closeTransports();
    this.mode = 'p2p';
    this._transport = this._createTransport('p2p');
    for (const participantId of present) this._transport.connectTo(participantId);
    emit(this, 'mode', { mode: 'p2p', previous: 'sfu' });
  }

  async _checkMigrations() {
    if (this._checkingMigrations) return;
    this._checkingMigrations = true;
    try {
      const sfu = this._transport;
      const mesh = this._retiring;
      if (!(sfu instanceof SfuTransport) || !mesh) return;
      for (const migration of [...this._migrations.values()]) {
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
        if (this._migrations.get(participantId) !== migration || this._transport !== sfu) continue;
        const link = mesh.links.get(participantId);
        const p2pGone = !link || link.closed || ['failed', 'closed'].includes(link.pc.connectionState);
        const waited = migration.trackSince !== null && now - migration.trackSince >= MIGRATION_WAIT_MS;
        if (ready || p2pGone || waited || now - migration.since >= MIGRATION_CAP_MS) {
          this._finishMigration(migration, Boolean(stream && stream.getTracks().length));
        }
      }
    } finally {
      this._checkingMigrations = false;
    }
  }

  /** The participant's tile moves to their SFU stream; their P2P connection closes shortly after. */
  _finishMigration(migration, haveSfuMedia) {
    const { participantId } = migration;
    this._migrations.delete(participantId);
    const sfu = this._transport;
    const mesh = this._retiring;
    if (sfu instanceof SfuTransport) {
      const stream = sfu.streams.get(participantId);
      for (const track of stream ? stream.getTracks() : []) emit(this, 'track', { participantId, stream, track });
      if (stream) emit(this, 'peer-state', { participantId, ...sfu.subscribeState() });
    }
    // The other side switches at about the same moment; a moment more of our P2P media covers its switch.
    setTimeout(() => {
      if (this._retiring !== mesh || this._migrations.has(participantId)) return;
      mesh.remove(participantId);
      this._endRetirementIfDone();
    }, haveSfuMedia ? MIGRATION_LINGER_MS : 0);
  }

  _endRetirementIfDone() {
    const mesh = this._retiring;
    if (!mesh || mesh.links.size > 0 || this._migrations.size > 0) return;
    this._retiring = null;
    clearInterval(this._migrationTimer);
    this._migrationTimer = null;
    mesh.close();
  }

  _closeTransports() {
    clearInterval(this._migrationTimer);
    this._migrationTimer = null;
    this._migrations.clear();
    if (this._retiring) {
      this._retiring.close();
      this._retiring = null;
    }
    if (this._transport) {
      this._transport.close();
      this._transport = null;
    }
  }

  /** Always relay without a relay to use: no connection can be made, and the person should know why. */
  _checkRelay() {
    if (this.relayOnly && !hasTurnServer(this.iceServers)) {
      this._fail(new HuddleError('relay_unavailable',
        'always relay is on, but the server offers no TURN relay: calls cannot connect'), false);
    }
  }

  _localTracks() {
    return {
      audio: this._localTrack('audio'),
      video: this._localTrack('video'),
      stream: this.localStream,
    };
  }

  _localTrack(kind) {
    if (!this.localStream) return null;
    const tracks = kind === 'audio' ? this.localStream.getAudioTracks() : this.localStream.getVideoTracks();
    return tracks.find((track) => track.readyState === 'live') || null;
  }

  // --- local media ---

  async _ensureLocalMedia(session) {
    if (this._localTrack('audio') || this._localTrack('video')) return;
    const { stream, error } = await captureLocalMedia(this.mediaConstraints);
    if (session !== this._session) {
      // Left while the browser was asking for the camera.
      for (const track of stream?.getTracks() || []) track.stop();
      return;
    }
    this.localStream = stream;
    this.mediaError = error;
    if (stream) {
      const audio = this._localTrack('audio');
      const video = this._localTrack('video');
      if (audio) audio.enabled = this._wantAudio;
      if (video) video.enabled = this._wantVideo;
      emit(this, 'local-stream', { stream });
    }
    if (error) {
      const what = stream ? 'joining without it' : 'joining without sending audio or video';
      this._fail(new HuddleError('media_unavailable', `${error.words}; ${what}`), false, { mediaError: error.name });
    }
  }

  _releaseLocalMedia() {
    if (!this.localStream) return;
    for (const track of this.localStream.getTracks()) track.stop();
    this.localStream = null;
    emit(this, 'local-stream', { stream: null });
  }

  /** Applies the wanted mic/camera state to the tracks and tells the server when it differs from `self`. */
  _applyLocalMedia(onlyIfChanged = false) {
    const audio = this._localTrack('audio');
    const video = this._localTrack('video');
    if (audio) audio.enabled = this._wantAudio;
    if (video) video.enabled = this._wantVideo;
    const publish = this.permissions?.publish !== false;
    const state = { audio: this.audioEnabled && publish, video: this.videoEnabled && publish };
    if (this.state === 'connected' && this._signaling) {
      const changed = !this.self || this.self.audio !== state.audio || this.self.video !== state.video;
      if (changed || !onlyIfChanged) this._signaling.send({ type: 'media', ...state });
    }
    emit(this, 'local-media', state);
    return state;
  }

  // --- helpers ---

  _teardown(reason) {
    // Said on purpose (leave): nothing to report about requests that no longer matter.
    this._rejectRecordingRequests(reason !== 'self_left');
    this._stopReconnecting();
    this._clearAbsent();
    this._stopVideoSizes();
    this._closeTransports();
    if (this._signaling) {
      const signaling = this._signaling;
      this._signaling = null;
      signaling.close(1000, 'leaving');
    }
    if (reason) {
      for (const [participantId, participant] of [...this.participants]) {
        this.participants.delete(participantId);
        emit(this, 'participant-left', { participantId, participant, reason });
      }
    }
    this.participants = new Map();
    this.self = null;
    this.resumeToken = null;
    this._doors = [];
    this._node = null;
    this.lastVideoSizes = null;
    if (this.activeSpeaker !== null) this._setActiveSpeaker(null);
    if (this.recording !== null) this._setRecording(null, 'left');
  }

  _fail(error, fatal = true, extra = {}) {
    emit(this, 'error', {
      code: error.code, message: error.message, source: error.source || 'local', fatal, ...extra,
    });
    return error;
  }

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    emit(this, 'state', { state, previous });
  }

  _joinedDetail() {
    return {
      self: this.self,
      room: this.room,
      participants: [...this.participants.values()],
      mode: this.mode,
      iceServers: this.iceServers,
      permissions: this.permissions,
      recording: this.recording,
    };
  }
}
