// The start page (/): pick a room name (one is suggested) and a display name, then go to the call page.

const ROOM_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
const NAME_KEY = 'huddle.name';
const ADJECTIVES = ['amber', 'brisk', 'calm', 'clever', 'cosy', 'eager', 'gentle', 'golden', 'happy', 'jolly',
  'lively', 'lucky', 'mellow', 'quiet', 'rapid', 'silver', 'sunny', 'swift', 'tidy', 'witty'];
const NOUNS = ['badger', 'comet', 'falcon', 'harbor', 'heron', 'island', 'lagoon', 'maple', 'meadow', 'otter',
  'panda', 'pebble', 'puffin', 'river', 'robin', 'summit', 'tiger', 'valley', 'walrus', 'willow'];

const form = document.getElementById('start-form');
const roomInput = document.getElementById('room-input');
const nameInput = document.getElementById('name-input');
const roomError = document.getElementById('room-error');
const nameError = document.getElementById('name-error');

function pick(list) {
  const index = crypto.getRandomValues(new Uint32Array(1))[0] % list.length;
  return list[index];
}

function randomRoom() {
  const digits = String(crypto.getRandomValues(new Uint16Array(1))[0] % 1000).padStart(3, '0');
  return `${pick(ADJECTIVES)}-${pick(NOUNS)}-${digits}`;
}

function cleanName(value) {
  const cleaned = value.trim().split(/\s+/).join(' ');
  return cleaned.length >= 1 && cleaned.length <= 64 ? cleaned : null;
}

function setError(input, element, text) {
  element.textContent = text || '';
  element.hidden = !text;
  input.setAttribute('aria-invalid', text ? 'true' : 'false');
}

const requested = new URLSearchParams(location.search).get('room');
roomInput.value = requested && ROOM_PATTERN.test(requested) ? requested : randomRoom();
try {
  nameInput.value = localStorage.getItem(NAME_KEY) || '';
} catch {
  // storage unavailable
}
(nameInput.value ? roomInput : nameInput).focus();

document.getElementById('new-room').addEventListener('click', () => {
  roomInput.value = randomRoom();
  setError(roomInput, roomError, '');
});
roomInput.addEventListener('input', () => setError(roomInput, roomError, ''));
nameInput.addEventListener('input', () => setError(nameInput, nameError, ''));

form.addEventListener('submit', (event) => {
  event.preventDefault();
  const room = roomInput.value.trim();
  const name = cleanName(nameInput.value);
  let ok = true;
  if (!ROOM_PATTERN.test(room)) {
    setError(roomInput, roomError, 'Use 1–64 letters, digits, “-” or “_” (no spaces).');
    ok = false;
  }
  if (!name) {
    setError(nameInput, nameError, 'Please enter your name (up to 64 characters).');
    ok = false;
  }
  if (!ok) {
    (ROOM_PATTERN.test(room) ? nameInput : roomInput).focus();
    return;
  }
  try {
    localStorage.setItem(NAME_KEY, name);
  } catch {
    // storage unavailable
  }
  location.assign(`/r/${encodeURIComponent(room)}?name=${encodeURIComponent(name)}`);
});
