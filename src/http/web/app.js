// The self-service page of totpd: log in, enrol a phone, keep recovery codes. Plain script, no
// build step, no third-party request; it talks only to the JSON API of the server that served it.
//
// What is kept where: the login key in sessionStorage (one tab's life, dropped at log out), the
// temp token of a two-step login and the recovery codes only in this script's variables. Nothing
// secret goes into a URL: every call is a fetch with a JSON body or an Authorization header.
'use strict';

(function () {
  const KEY_STORAGE = 'totpd.key';
  // Relative to the page, so the page also works behind a proxy that serves it under a prefix.
  const API = 'api/v1/auth/';
  // At or below this many recovery codes left, the page suggests regenerating them.
  const FEW_CODES = 3;

  const $ = (id) => document.getElementById(id);

  let tempToken = null;
  let username = '';
  let recoveryCodes = [];

  // ---- the API ----

  class ApiError extends Error {
    constructor(status, code, body, retryAfter) {
      super(code);
      this.status = status;
      this.code = code;
      this.body = body;
      this.retryAfter = retryAfter;
    }
  }

  async function api(method, path, body, withKey) {
    const headers = {};
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (withKey) headers.Authorization = 'Token ' + (sessionStorage.getItem(KEY_STORAGE) || '');
    let response;
    try {
      response = await fetch(API + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: 'no-store',
        credentials: 'omit',
      });
    } catch (e) {
      throw new ApiError(0, 'network_error', null, null);
    }
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null; // a proxy's HTML error page, say: only the status is used
    }
    if (response.ok) return data || {};
    let code = data && typeof data.code === 'string' ? data.code : 'unknown';
    if (response.status === 503) code = 'service_unavailable';
    const retry = parseInt(response.headers.get('Retry-After') || '', 10);
    throw new ApiError(response.status, code, data, Number.isFinite(retry) ? retry : null);
  }

  // ---- turning errors into sentences ----

  function waitText(seconds) {
    if (seconds === null || seconds === undefined) return 'a while';
    if (seconds < 120) return seconds === 1 ? '1 second' : seconds + ' seconds';
    if (seconds < 7200) return Math.ceil(seconds / 60) + ' minutes';
    return Math.ceil(seconds / 3600) + ' hours';
  }

  // The first message the server gave for a field, if it is plain text.
  function fieldMessage(body, field) {
    const list = body && body[field];
    return Array.isArray(list) && typeof list[0] === 'string' ? list[0] : '';
  }

  // A sentence for `error` in the context of `what` ('login', 'verify', 'activate', 'manage',
  // 'status', 'session'). Never the raw body.
  function describe(error, what) {
    const code = error.code;
    const recoveryHint = what === 'activate' ? '' : ' You can also use a recovery code.';
    switch (code) {
      case 'network_error':
        return 'The server could not be reached. Check your connection and try again.';
      case 'service_unavailable':
        return 'The server is unavailable at the moment. Please try again in a minute.';
      case 'throttled':
        return 'Too many attempts from this network. Please wait ' +
          waitText(error.retryAfter) + ' and try again.';
      case 'locked':
        return 'Too many wrong codes: this account is locked. Try again in ' +
          waitText(error.retryAfter) + '.' + recoveryHint;
      case 'invalid_code':
        return 'That code is not right, or it was already used. Wait for the next code in your app and try again.';
      case 'clock_skew':
        // The server's sentence says how far off the phone's clock seems, and what to do.
        return fieldMessage(error.body, 'token') ||
          'Your phone\'s clock seems to be off. Set the date and time on your phone to automatic (network time), then try a new code.';
      case 'invalid_temp_token':
        return 'Your login has expired. Please log in again.';
      case 'invalid_credentials':
        return 'The username or password is wrong.';
      case 'not_authenticated':
      case 'authentication_failed':
        return 'Your session has ended. Please log in again.';
      case 'totp_already_active':
        return 'Two-factor authentication is already on.';
      case 'totp_not_pending':
        return 'The setup was not found. Press "Set up" to start again.';
      case 'totp_not_active':
        return 'Two-factor authentication is already off.';
      case 'required':
      case 'blank':
      case 'null':
        if (what === 'login') {
          return fieldMessage(error.body, 'username') ? 'Enter your username.' : 'Enter your password.';
        }
        if (what === 'manage' && error.action === 'deactivate') {
          return 'Enter a code from your app, or a recovery code, to turn off two-factor authentication.';
        }
        return what === 'activate'
          ? 'Enter the 6-digit code from your app.'
          : 'Enter the 6-digit code from your app, or a recovery code.';
      case 'invalid':
        if (what === 'login') return 'The username or password is not valid.';
        return what === 'activate'
          ? 'A code is 6 digits, like 123 456.'
          : 'A code is 6 digits, like 123 456, or a recovery code, like abcd-efgh-jkmn-pqrs.';
      case 'max_length':
        return 'That is too long.';
      default:
        return 'Something went wrong (error ' + (error.status || '?') + '). Please try again.';
    }
  }

  // ---- showing things ----

  function show(el, visible) {
    el.hidden = !visible;
  }

  function setError(id, text) {
    $(id).textContent = text || '';
    const input = { 'login-error': 'login-password', 'verify-error': 'verify-code',
      'activate-error': 'activate-code', 'manage-error': 'manage-code' }[id];
    if (input) {
      if (text) $(input).setAttribute('aria-invalid', 'true');
      else $(input).removeAttribute('aria-invalid');
    }
  }

  function notice(text) {
    $('notice').textContent = text || '';
    show($('notice'), Boolean(text));
  }

  function view(name, focusId) {
    for (const v of ['login', 'verify', 'account']) show($('view-' + v), v === name);
    const target = $(focusId || name + '-title');
    if (target) target.focus();
  }

  // While a request runs, its buttons are disabled so a double press cannot send it twice.
  async function busy(form, work) {
    const buttons = form.querySelectorAll('button');
    buttons.forEach((b) => { b.disabled = true; });
    form.setAttribute('aria-busy', 'true');
    try {
      await work();
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
      form.removeAttribute('aria-busy');
    }
  }

  function groupSecret(secret) {
    return (secret.match(/.{1,4}/g) || []).join(' ');
  }

  // ---- the session ----

  function dropSession() {
    sessionStorage.removeItem(KEY_STORAGE);
    tempToken = null;
    recoveryCodes = [];
    $('recovery-codes').replaceChildren();
    $('secret-key').textContent = '';
    $('qr-code').removeAttribute('src');
    for (const id of ['verify-code', 'activate-code', 'manage-code', 'login-password']) $(id).value = '';
    for (const id of ['verify-error', 'activate-error', 'manage-error', 'status-error']) setError(id, '');
    show($('part-enrol'), false);
    show($('part-codes'), false);
  }

  function startAgain(message) {
    dropSession();
    notice('');
    setError('login-error', message);
    view('login', $('login-username').value ? 'login-password' : 'login-username');
  }

  function loggedIn(key) {
    sessionStorage.setItem(KEY_STORAGE, key);
    tempToken = null;
    $('login-password').value = '';
    $('verify-code').value = '';
  }

  // A failed call with a key: a dead key sends the user back to log in.
  function handleKeyError(error, errorId, what) {
    if (error.code === 'not_authenticated' || error.code === 'authentication_failed') {
      startAgain(describe(error, what));
      return;
    }
    setError(errorId, describe(error, what));
  }

  // ---- the account view ----

  async function refreshStatus() {
    let status;
    try {
      status = await api('GET', 'totp/', undefined, true);
    } catch (error) {
      handleKeyError(error, 'status-error', 'status');
      return false;
    }
    setError('status-error', '');
    const left = status.recovery_codes_remaining;
    if (status.active) {
      let text = 'Two-factor authentication is on. ' + (left === 1 ? '1 recovery code' : left + ' recovery codes') + ' left.';
      if (left <= FEW_CODES) text += ' Few are left: regenerate your recovery codes below.';
      $('status-text').textContent = text;
    } else {
      $('status-text').textContent = 'Two-factor authentication is off.';
    }
    // While enrolling, the QR code stays until activation; a reload loses the secret (it is
    // shown only once), so the page then offers setup again, which replaces the pending one.
    const enrolling = !status.active && !$('part-enrol').hidden;
    show($('part-setup'), !status.active && !enrolling);
    show($('part-enrol'), enrolling);
    show($('part-manage'), Boolean(status.active));
    return true;
  }

  function showRecoveryCodes(codes) {
    recoveryCodes = codes.slice();
    const list = $('recovery-codes');
    list.replaceChildren(...codes.map((code) => {
      const item = document.createElement('li');
      item.textContent = code;
      return item;
    }));
    show($('part-codes'), true);
    $('codes-title').focus();
  }

  // ---- actions ----

  async function onLogin(event) {
    event.preventDefault();
    setError('login-error', '');
    notice('');
    const name = $('login-username').value;
    const password = $('login-password').value;
    if (!name.trim()) { setError('login-error', 'Enter your username.'); $('login-username').focus(); return; }
    if (!password) { setError('login-error', 'Enter your password.'); $('login-password').focus(); return; }
    await busy($('login-form'), async () => {
      try {
        const answer = await api('POST', 'login/', { username: name, password });
        username = name.trim();
        $('login-password').value = '';
        if (answer.totp_required) {
          tempToken = answer.temp_token;
          setError('verify-error', '');
          $('verify-code').value = '';
          view('verify', 'verify-code');
        } else {
          loggedIn(answer.key);
          view('account');
          await refreshStatus();
        }
      } catch (error) {
        setError('login-error', describe(error, 'login'));
        $('login-password').focus();
      }
    });
  }

  async function onVerify(event) {
    event.preventDefault();
    setError('verify-error', '');
    const code = $('verify-code').value.trim();
    if (!code) { setError('verify-error', describe({ code: 'required' }, 'verify')); return; }
    await busy($('verify-form'), async () => {
      try {
        const answer = await api('POST', 'totp/verify/', { temp_token: tempToken, token: code });
        loggedIn(answer.key);
        view('account');
        if (typeof answer.recovery_codes_remaining === 'number') {
          const left = answer.recovery_codes_remaining;
          let text = 'You logged in with a recovery code. ' +
            (left === 1 ? '1 recovery code is' : left + ' recovery codes are') + ' left.';
          if (left <= FEW_CODES) text += ' Few are left: regenerate your recovery codes below.';
          notice(text);
        }
        await refreshStatus();
      } catch (error) {
        if (error.code === 'invalid_temp_token') {
          startAgain(describe(error, 'verify'));
          return;
        }
        setError('verify-error', describe(error, 'verify'));
        $('verify-code').select();
      }
    });
  }

  async function onSetup() {
    setError('status-error', '');
    notice('');
    await busy($('part-setup'), async () => {
      try {
        const answer = await api('POST', 'totp/setup/', undefined, true);
        $('qr-code').src = answer.qr_code;
        $('secret-key').textContent = groupSecret(answer.secret_key);
        $('activate-code').value = '';
        setError('activate-error', '');
        show($('part-setup'), false);
        show($('part-enrol'), true);
        $('enrol-title').focus();
      } catch (error) {
        handleKeyError(error, 'status-error', 'status');
        if (error.code === 'totp_already_active') await refreshStatus();
      }
    });
  }

  async function onActivate(event) {
    event.preventDefault();
    setError('activate-error', '');
    const code = $('activate-code').value.trim();
    if (!code) { setError('activate-error', describe({ code: 'required' }, 'activate')); return; }
    await busy($('activate-form'), async () => {
      try {
        const answer = await api('POST', 'totp/activate/', { token: code }, true);
        $('activate-code').value = '';
        show($('part-enrol'), false);
        $('secret-key').textContent = '';
        $('qr-code').removeAttribute('src');
        await refreshStatus();
        notice('Done: from now on, logging in asks for a code. Save your recovery codes below.');
        showRecoveryCodes(answer.recovery_codes);
      } catch (error) {
        handleKeyError(error, 'activate-error', 'activate');
        if (error.code === 'totp_not_pending' || error.code === 'totp_already_active') {
          show($('part-enrol'), false);
          await refreshStatus();
        }
      }
    });
  }

  async function onRegenerate(event) {
    event.preventDefault();
    setError('manage-error', '');
    notice('');
    const code = $('manage-code').value.trim();
    await busy($('manage-form'), async () => {
      try {
        const answer = await api('POST', 'totp/recovery-codes/', { token: code }, true);
        $('manage-code').value = '';
        await refreshStatus();
        notice('New recovery codes are ready; the old ones no longer work.');
        showRecoveryCodes(answer.recovery_codes);
      } catch (error) {
        handleKeyError(error, 'manage-error', 'manage');
        $('manage-code').focus();
      }
    });
  }

  async function onDeactivate() {
    setError('manage-error', '');
    notice('');
    const code = $('manage-code').value.trim();
    await busy($('manage-form'), async () => {
      try {
        // The code is sent only when one is typed: the server asks for one when its policy wants it.
        await api('POST', 'totp/deactivate/', code ? { token: code } : undefined, true);
        $('manage-code').value = '';
        show($('part-codes'), false);
        $('recovery-codes').replaceChildren();
        recoveryCodes = [];
        await refreshStatus();
        notice('Two-factor authentication is off. Your other sessions were logged out.');
        $('account-title').focus();
      } catch (error) {
        error.action = 'deactivate';
        handleKeyError(error, 'manage-error', 'manage');
        $('manage-code').focus();
      }
    });
  }

  function onDownload() {
    const lines = ['Recovery codes for ' + (username || 'your account') + ' (' + location.host + ')',
      'Each code works once.', '', ...recoveryCodes, ''];
    const blob = new Blob([lines.join('\n')], { type: 'text/plain' });
    const url = URL.createObjectURL(blob);
    const link = document.createElement('a');
    link.href = url;
    link.download = 'recovery-codes.txt';
    document.body.append(link);
    link.click();
    link.remove();
    // After the click has started the download; the codes should not stay reachable by URL.
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }

  async function onLogout(all) {
    const button = all ? $('logout-all-button') : $('logout-button');
    setError('status-error', '');
    button.disabled = true;
    let message = all ? 'You are logged out on every device.' : 'You are logged out.';
    try {
      await api('POST', all ? 'logout-all/' : 'logout/', undefined, true);
    } catch (error) {
      // The key is dropped here anyway; a dead key is already logged out.
      if (error.code !== 'authentication_failed' && error.code !== 'not_authenticated') {
        message = 'This page forgot your login, but the server could not be told: ' + describe(error, 'session');
      }
    } finally {
      button.disabled = false;
    }
    dropSession();
    view('login', 'login-username');
    notice(message);
  }

  // ---- start ----

  function start() {
    $('login-form').addEventListener('submit', onLogin);
    $('verify-form').addEventListener('submit', onVerify);
    $('verify-restart').addEventListener('click', () => startAgain(''));
    $('setup-button').addEventListener('click', onSetup);
    $('activate-form').addEventListener('submit', onActivate);
    $('manage-form').addEventListener('submit', onRegenerate);
    $('deactivate-button').addEventListener('click', onDeactivate);
    $('codes-download').addEventListener('click', onDownload);
    $('codes-print').addEventListener('click', () => window.print());
    $('codes-done').addEventListener('click', () => {
      show($('part-codes'), false);
      $('recovery-codes').replaceChildren();
      recoveryCodes = [];
      $('account-title').focus();
    });
    $('logout-button').addEventListener('click', () => onLogout(false));
    $('logout-all-button').addEventListener('click', () => onLogout(true));

    if (sessionStorage.getItem(KEY_STORAGE)) {
      view('account');
      refreshStatus();
    } else {
      view('login', 'login-username');
    }
  }

  start();
}());
