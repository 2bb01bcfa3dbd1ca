// The settings dialog: "Always relay calls" (HuddleClient relayOnly), remembered in this browser; camera,
// microphone and speaker (ui/prejoin.js switches them); the keyboard shortcuts list (ui/shortcuts.js).

import { $ } from './dom.js';
import { addDevicePicker, refreshDevices } from './prejoin.js';
import { showShortcuts } from './shortcuts.js';

// '1' when on. Remembered in this browser, like the name.
const RELAY_KEY = 'huddle.alwaysRelay';

const ui = {
  settingsButton: $('#settings-button'),
  settingsPanel: $('#settings-panel'),
  alwaysRelay: $('#always-relay'),
  alwaysRelayLater: $('#always-relay-later'),
  showShortcuts: $('#show-shortcuts'),
};

/** Whether this browser was told to always relay calls (the option for a new HuddleClient). */
export function storedRelayChoice() {
  try {
    return localStorage.getItem(RELAY_KEY) === '1';
  } catch {
    return false; // storage blocked: the setting starts off
  }
}

function showSettings(open) {
  ui.settingsPanel.hidden = !open;
  ui.settingsButton.setAttribute('aria-expanded', String(open));
  if (open) refreshDevices(); // devices may have come and gone since
}

/** The settings of `client` (a HuddleClient), changed in the dialog from now on. */
export function initSettings(huddle) {
  ui.alwaysRelay.checked = huddle.relayOnly;
  ui.settingsButton.addEventListener('click', () => showSettings(ui.settingsPanel.hidden));
  addDevicePicker({
    camera: $('#settings-camera'), microphone: $('#settings-microphone'), speaker: $('#settings-speaker'),
  });
  ui.showShortcuts.addEventListener('click', () => {
    showSettings(false);
    showShortcuts(true);
  });

  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && !ui.settingsPanel.hidden) {
      showSettings(false);
      ui.settingsButton.focus();
    }
  });

  document.addEventListener('pointerdown', (event) => {
    if (ui.settingsPanel.hidden) return;
    if (!ui.settingsPanel.contains(event.target) && !ui.settingsButton.contains(event.target)) showSettings(false);
  });

  ui.alwaysRelay.addEventListener('change', () => {
    const on = ui.alwaysRelay.checked;
    huddle.relayOnly = on;
    try {
      localStorage.setItem(RELAY_KEY, on ? '1' : '0');
    } catch {
      // private mode: it holds for this page only
    }
    // Connections that exist keep their policy (the client reads it when it makes one, from `joined` on).
    ui.alwaysRelayLater.hidden = !['connected', 'reconnecting'].includes(huddle.state);
  });

  huddle.addEventListener('state', (event) => {
    // A new join uses the setting as it is now.
    if (event.detail.state === 'connecting') ui.alwaysRelayLater.hidden = true;
  });
}
