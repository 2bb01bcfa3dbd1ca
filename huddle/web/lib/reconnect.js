// Reconnection (docs/protocol.md, "Reconnection"): resuming a call on a new socket after the signaling socket
// dropped, through the doors the server named, with backoff; and following `redirect` answers to a `join`.

import { HuddleError } from './errors.js';
import { cleanSignalingUrl } from './signaling.js';

// Waits before each round of attempts to open a new socket, the last one repeating until the grace period
// (`reconnect_grace` from `joined`) is over. A round tries each door (`doors` from `joined`) in turn, the next
// one as soon as the one before failed. One attempt may take at most RESUME_ATTEMPT_MS.
export const RECONNECT_DELAYS_MS = Object.freeze([500, 1000, 2000]);
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
export const DEFAULT_RECONNECT_GRACE_S = 20;

/** Errors after which resuming cannot work: the call is over for this client. */
const RESUME_FATAL = new Set(['resume_failed', 'unauthorized', 'token_expired', 'wrong_room', 'invalid_room',
  'invalid_name', 'room_full']);

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new HuddleError('timeout', `${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Sends `join` on the open `channel`, following `redirect` answers (the call is on another node): each time
 * the same `join` goes out on a new socket (`newChannel(url)`), at most MAX_REDIRECTS times. `adopt(next)`
 * makes the new socket the one in use before the old one closes, or returns false when the join was
 * abandoned meanwhile. `limit(promise, what)` bounds each step. Resolves with the socket that answered
 * (its `joined` was handled as it came); rejects with a HuddleError.
 */
export async function joinFollowingRedirects(channel, request, { newChannel, adopt, limit = (promise) => promise }) {
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
    const next = newChannel(url);
    if (!adopt(next)) {
      next.close(1000, 'not joining');
      throw new HuddleError('aborted', 'left before the call was joined');
    }
    current.close(1000, 'redirected');
    current = next;
    await limit(current.open(), 'opening the socket');
  }
}

/**
 * Resumes a call on new sockets until one takes it or the grace period is over. The client it works for
 * (`host`) gives it:
 *   newChannel(url)       a SignalingChannel whose `joined` the client hands to takeOver()
 *   session()             the client's join session: attempts of an older one are dropped
 *   reconnecting()        whether the client still waits to be resumed
 *   isSignaling(channel)  whether `channel` carries the call now (it resumed)
 *   resumeRequest()       the `join` that resumes the call (with the resume token)
 *   giveUp(error)         the call cannot be resumed
 */
export class Reconnector {
  constructor({ delays = RECONNECT_DELAYS_MS, host }) {
    this.delays = delays.length ? [...delays] : [...RECONNECT_DELAYS_MS];
    this.host = host;
    this.doors = []; // WebSocket URLs to resume on (`doors` from `joined`), the node we are on first
    this.node = null; // the node serving our call, as it names itself (the first of `doors`)
    this.resuming = null; // the SignalingChannel of a resume attempt
    this._round = null; // {deadline, graceS, doors, next, tries, rounds, immediate, quickRetries, timer}
  }

  /**
   * Where to resume (`doors` from `joined`): the URL this socket reached the node at first (`url`), then the
   * other nodes. The first door is the node's own name for itself, kept to tell whether a later resume
   * landed on another node; the URL that worked stands in for it, as a proxy in front may be the only way
   * there. Returns whether the call moved to another node since the doors were last set.
   */
  setDoors(message, url) {
    const previousNode = this.node;
    const named = Array.isArray(message.doors) ? message.doors.map(cleanSignalingUrl).filter(Boolean) : [];
    this.node = named[0] || null;
    this.doors = [...new Set([url, ...named.slice(1)].filter(Boolean))];
    return Boolean(previousNode && this.node && previousNode !== this.node);
  }

  forgetDoors() {
    this.doors = [];
    this.node = null;
  }

  /**
   * Starts resuming, trying the doors in turn (`fallbackUrl` when there are none): the one the call was on
   * first, unless that node said it stops serving (close code 1012, `serviceRestart`), in which case another
   * door goes first and at once.
   */
  start({ session, graceS = DEFAULT_RECONNECT_GRACE_S, fallbackUrl, serviceRestart = false }) {
    const doors = this.doors.length ? [...this.doors] : [fallbackUrl];
    this._round = {
      deadline: performance.now() + graceS * 1000,
      graceS,
      doors,
      next: serviceRestart && doors.length > 1 ? 1 : 0, // index of the door the next attempt uses
      tries: 0,
      rounds: 0, // rounds begun after a wait (the backoff step)
      immediate: serviceRestart,
      quickRetries: 0, // doors asked again soon after they sent us on to a node we could not reach
      timer: null,
    };
    this._schedule(session);
  }

  /**
   * Whether `message` on `channel` is the `joined` that resumes the call: the resume attempt succeeded, and
   * this socket carries the call from now on (before any message after `joined` on it is handled).
   */
  takeOver(channel, message) {
    if (this.resuming !== channel || message.type !== 'joined') return false;
    this.resuming = null;
    return true;
  }

  /** Leaving: a resume attempt in flight, were its `join` to be taken, is ended by `leave` after it. */
  leave() {
    const resuming = this.resuming;
    if (!resuming) return;
    this.resuming = null;
    if (resuming.send({ type: 'leave' })) setTimeout(() => resuming.close(1000, 'left'), 2000);
    else resuming.close(1000, 'left');
  }

  stop() {
    if (this._round?.timer) clearTimeout(this._round.timer);
    this._round = null;
    if (this.resuming) {
      const channel = this.resuming;
      this.resuming = null;
      channel.close(1000, 'not resuming');
    }
  }

  /** `again`: ask this door again soon (it sent us on to a node we could not reach), outside the rounds. */
  _schedule(session, again = null) {
    const round = this._round;
    if (!round || session !== this.host.session()) return;
    const { doors } = round;
    let wait = 0; // the next door of a round is tried as soon as the one before failed
    if (again !== null) {
      wait = REDIRECT_RETRY_MS + Math.random() * REDIRECT_RETRY_JITTER_MS;
      round.quickRetries += 1;
    } else if (round.tries % doors.length === 0) {
      if (round.immediate && round.tries === 0) {
        wait = 0;
      } else {
        wait = this.delays[Math.min(round.rounds, this.delays.length - 1)];
        round.rounds += 1;
      }
    }
    // The last attempt comes just before the grace period is over, however the backoff falls.
    const left = round.deadline - performance.now() - RESUME_LAST_MARGIN_MS;
    const delay = Math.min(wait, left);
    let door = again;
    if (door === null) {
      door = doors[round.next % doors.length];
      round.next += 1;
      round.tries += 1;
    }
    if (delay < 0) {
      this.host.giveUp(new HuddleError('resume_failed',
        `could not reconnect to the call within ${round.graceS} seconds`));
      return;
    }
    round.timer = setTimeout(() => this._attempt(session, door), delay);
  }

  async _attempt(session, door) {
    const round = this._round;
    if (!round || session !== this.host.session() || !this.host.reconnecting()) return;
    round.timer = null;
    let channel = this.host.newChannel(door);
    let redirected = false;
    this.resuming = channel;
    const budget = Math.max(500, Math.min(RESUME_ATTEMPT_MS, round.deadline - performance.now()));
    const limit = (promise, what) => withTimeout(promise, budget, what);
    let failure = null;
    try {
      await limit(channel.open(), 'opening the socket');
      if (this.resuming !== channel) return;
      channel = await joinFollowingRedirects(channel, this.host.resumeRequest(), {
        newChannel: this.host.newChannel,
        adopt: (next) => {
          if (this.resuming !== channel) return false;
          this.resuming = next;
          channel = next;
          redirected = true;
          return true;
        },
        limit,
      });
    } catch (err) {
      failure = err instanceof HuddleError ? err
        : new HuddleError('connection_failed', String(err?.message || err), { cause: err });
    }
    if (this.host.isSignaling(channel)) return; // resumed (the client took over)
    if (this.resuming === channel) this.resuming = null;
    channel.close(1000, 'resume attempt over');
    if (session !== this.host.session() || !this.host.reconnecting()) return;
    // Anything else (a socket that would not open or closed, try_again, a timeout) is worth another try.
    if (failure && failure.source === 'server' && RESUME_FATAL.has(failure.code)) {
      const error = failure.code === 'resume_failed'
        ? new HuddleError('resume_failed', 'you were away from the call too long to rejoin it as you were',
          { source: 'server' })
        : failure;
      this.host.giveUp(error);
      return;
    }
    const quick = failure && redirected && round.quickRetries < REDIRECT_RETRIES_MAX;
    this._schedule(session, quick ? door : null);
  }
}
