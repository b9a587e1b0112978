-- A deploy key per project (issue 12): an ed25519 pair Hefring made. The public half
-- (`ssh-ed25519 ...`) is shown to whoever adds it to the repository; the private half (OpenSSH
-- format) is sealed with the installation's secret key like every other secret at rest.
ALTER TABLE projects ADD COLUMN deploy_public_key TEXT;
ALTER TABLE projects ADD COLUMN deploy_private_key TEXT;
