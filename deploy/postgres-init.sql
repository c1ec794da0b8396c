-- Roles matching deploy/users.example.txt so the compose stack works end to end.
CREATE ROLE app LOGIN PASSWORD 'app-password';
CREATE ROLE report LOGIN PASSWORD 'report-password';
CREATE DATABASE app OWNER app;
GRANT CONNECT ON DATABASE app TO report;
