// "p2p" mode: browser to browser, one RTCPeerConnection per remote participant.

import { HuddleError } from './errors.js';
import { SCREEN_MAX_BITRATE, screenKey, setScreenDegradation } from './screen.js';
import { MAX_ICE_RESTARTS, Transport, direction } from './transport.js';

/**
 * One RTCPeerConnection to one remote participant. The `initiator` (the later joiner) sends the first offer
 * and the ICE restarts; either side offers again to add or retire its screen share. When both offered at once,
 * the initiator's offer wins: the other side rolls its own back, answers, and offers again. Every incoming
 * signal goes through one queue, so descriptions and candidates are applied in the order they arrived;
 * candidates that come before a remote description wait for it.
 *
 * Screen share: ours goes on transceivers of our own (one encoding, made on the first share, inactive between
 * shares); theirs is told apart from their camera by its stream id (`screenStreamOf(participantId)`, which
 * their `media` message gave before their offer) and reported under the key `<participant id>~screen`.
 */
class PeerLink {
  constructor({
    participantId, initiator, iceServers, iceTransportPolicy, localTracks, publish, subscribe, send, events,
    screen, screenStreamOf,
  }) {
    this.participantId = participantId;
    this.initiator = initiator;
    this.localTracks = localTracks; // {audio: MediaStreamTrack|null, video: ..., stream: MediaStream|null}
    this.publish = publish;
    this.subscribe = subscribe;
    this.send = send;
    this.events = events;
    this.remoteStream = new MediaStream();
    this.screen = screen; // ours: {video, audio, stream} or null
    this.screenStreamOf = screenStreamOf;
    this.remoteScreen = new MediaStream(); // theirs
    this._screenTransceivers = { video: null, audio: null };
    this._offerDue = false; // our screen changed while an offer was out (or before the first one came)
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
    if (!this.initiator) {
      if (this.screen) this.setScreen(this.screen); // offered once their first offer is answered
      return;
    }
    this._enqueue(async () => {
      await this._addInitiatorTransceivers();
      await this._syncScreenTransceivers();
      await this._sendOffer(false);
    });
  }

  /** Our screen share starts ({video, audio, stream}) or stops (null): an offer adds or retires it. */
  setScreen(screen) {
    this.screen = screen;
    this._enqueue(async () => {
      if (!(await this._syncScreenTransceivers())) return;
      this._offerDue = true;
      // The side that did not initiate offers only after the first offer is answered (no early collision).
      if (this.initiator || this.pc.remoteDescription) await this._offerIfDue();
    });
  }

  _isOwnScreen(transceiver) {
    return transceiver === this._screenTransceivers.video || transceiver === this._screenTransceivers.audio;
  }

  /** Puts our screen's tracks on their transceivers (sendonly), or takes them off; true when that changed. */
  async _syncScreenTransceivers() {
    let changed = false;
    for (const kind of ['video', 'audio']) {
      const track = this.publish ? this.screen?.[kind] || null : null;
      let transceiver = this._screenTransceivers[kind];
      if (!transceiver) {
        if (!track) continue;
        const init = { direction: 'sendonly', streams: [this.screen.stream] };
        if (kind === 'video') init.sendEncodings = [{ maxBitrate: SCREEN_MAX_BITRATE }];
        transceiver = this.pc.addTransceiver(track, init);
        this._screenTransceivers[kind] = transceiver;
        if (kind === 'video') await setScreenDegradation(transceiver.sender);
        changed = true;
        continue;
      }
      if (transceiver.sender.track !== track) await transceiver.sender.replaceTrack(track);
      // A new share is a new stream: its id is the one our `media` message names.
      if (track && transceiver.sender.setStreams) transceiver.sender.setStreams(this.screen.stream);
      const wanted = track ? 'sendonly' : 'inactive';
      if (transceiver.direction !== wanted) {
        transceiver.direction = wanted;
        changed = true;
      }
    }
    return changed;
  }

  async _offerIfDue() {
    if (!this._offerDue || this.retired || this.pc.signalingState !== 'stable') return;
    this._offerDue = false;
    await this._sendOffer(false);
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
    for (const track of [...this.remoteStream.getTracks(), ...this.remoteScreen.getTracks()]) track.stop();
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
      // Offers crossed (one of them adds or retires a screen share): the initiator's wins; the other side
      // offers its change again once this one is answered.
      if (this.initiator) return;
      await this.pc.setLocalDescription({ type: 'rollback' });
      this._offerDue = true;
    }
    await this.pc.setRemoteDescription({ type: 'offer', sdp });
    await this._configureAnswerTransceivers();
    await this._flushCandidates();
    const answer = await this.pc.createAnswer();
    await this.pc.setLocalDescription(answer);
    this.send({ type: 'answer', to: this.participantId, sdp: this.pc.localDescription.sdp });
    await this._offerIfDue();
  }

  /**
   * On the answering side: put the local tracks on the transceivers the offer created. The first audio and
   * video sections are the microphone and camera; later ones are the other side's screen share (received only).
   */
  async _configureAnswerTransceivers() {
    const seen = new Set(); // kinds whose microphone/camera section came already
    for (const transceiver of this.pc.getTransceivers()) {
      if (this._isOwnScreen(transceiver)) continue;
      const kind = transceiver.receiver.track.kind;
      const theirScreen = seen.has(kind);
      seen.add(kind);
      if (transceiver.mid === null || transceiver.stopped || transceiver.currentDirection !== null) continue;
      if (theirScreen) {
        transceiver.direction = direction(false, this.subscribe);
        continue;
      }
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
    await this._offerIfDue();
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
    const msid = event.streams && event.streams[0];
    if (msid && msid.id === this.screenStreamOf(this.participantId)) {
      this._onScreenTrack(track, msid);
      return;
    }
    if (!this.remoteStream.getTracks().includes(track)) {
      // One stream per participant, whatever stream ids the other side used (or none).
      for (const old of this.remoteStream.getTracks()) {
        if (old.kind === track.kind) this.remoteStream.removeTrack(old);
      }
      this.remoteStream.addTrack(track);
    }
    this.events.track(this.participantId, this.remoteStream, track);
  }

  _onScreenTrack(track, msid) {
    if (!this.remoteScreen.getTracks().includes(track)) {
      for (const old of this.remoteScreen.getTracks()) {
        if (old.kind === track.kind) this.remoteScreen.removeTrack(old);
      }
      this.remoteScreen.addTrack(track);
      // Their share stopped: its section went inactive, which takes the track out of its msid stream.
      msid.addEventListener('removetrack', (event) => {
        if (event.track !== track || !this.remoteScreen.getTracks().includes(track)) return;
        this.remoteScreen.removeTrack(track);
        this.events.trackRemoved(screenKey(this.participantId), this.remoteScreen, track);
      });
    }
    this.events.track(screenKey(this.participantId), this.remoteScreen, track);
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
 * "p2p" mode: a full mesh of PeerLinks, one per remote participant. The later joiner offers (connectTo);
 * everyone already present waits for that offer (expect).
 */
export class MeshTransport extends Transport {
  constructor(options) {
    super(options);
    this.links = new Map(); // participant id -> PeerLink
    this.retired = false;
    this.screen = options.screen || null; // our screen share: {video, audio, stream} or null
    // participant id -> the stream id of their screen share (their `media.screen_stream`), or null
    this.screenStreamOf = options.screenStreamOf || (() => null);
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

  /** Our screen share starts ({video, audio, stream}) or stops (null), on every link. */
  setScreen(screen) {
    this.screen = screen || null;
    if (this.retired) return; // the SFU carries it now
    for (const link of this.links.values()) link.setScreen(this.screen);
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
      screen: this.screen,
      screenStreamOf: this.screenStreamOf,
    });
    this.links.set(participantId, link);
    return link;
  }
}
