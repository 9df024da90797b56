// The mailed reset link: the token rides in the fragment (#token=...), which browsers never send to a
// server or in a Referer; this page posts it once with the new password.
const params = new URLSearchParams(location.hash.slice(1));
const token = params.get("token");
const form = document.getElementById("reset-form");
const status = document.getElementById("reset-status");
history.replaceState(null, "", location.pathname);  // the token leaves the address bar and history

if (!token) {
  form.hidden = true;
  status.textContent = "This link has no reset token; ask for a new one from the sign-in page.";
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const response = await fetch("/api/v1/auth/password-reset/confirm", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({token, new_password: document.getElementById("new-password").value}),
  });
  const body = await response.json().catch(() => ({}));
  if (response.ok) {
    form.hidden = true;
    status.textContent = "Your password is set. Every device was signed out; sign in with the new password.";
  } else {
    status.textContent = body.error?.message ?? "The password could not be set.";
  }
});
